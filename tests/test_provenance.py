"""udtimm.provenance: the commit and the state of the tree that a run records, and file hashes."""

import hashlib
import json
import os
import subprocess
import tempfile

import train
import validate
from udtimm import config, data_flags, provenance
from udtimm.data import DataSource


def test_source_state_names_this_checkouts_commit_and_whether_it_changed() -> None:
    state = provenance.source_state()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # an exported copy without .git
        assert state == {"commit": "unknown", "dirty": "unknown"}
        return
    status = subprocess.run(["git", "status", "--porcelain"], cwd=provenance.ROOT, capture_output=True, text=True)
    assert state == {"commit": head.stdout.strip(), "dirty": "yes" if status.stdout.strip() else "no"}


def test_source_state_without_git_says_unknown(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")  # no git to be found
    assert provenance.source_state() == {"commit": "unknown", "dirty": "unknown"}


def test_file_sha256_reads_the_whole_file_in_blocks(tmp_path) -> None:
    data = bytes(range(256)) * 9000  # more than one block
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    assert provenance.file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_the_record_names_the_data_variant_and_a_mismatch_names_both() -> None:
    args = train.parse_args(["--digits-ambiguous", "--digits-trainval", "1500", "--drop-labels", "0.5"])
    record = provenance.provenance_record(config.training_settings(args).data)
    assert record["dataset"] == "digits" and record["options"]["ambiguous"] is True
    assert (record["val_split"], record["drop_labels"], record["commit"]) == ("val", 0.5,
                                                                             provenance.source_state()["commit"])
    metadata = {"provenance": json.dumps(record)}
    plain = data_flags.data_source(validate.parse_args(["--checkpoint", "c", "--digits-trainval", "1500"]), "digits")
    line = provenance.data_variant_mismatch("c.safetensors", metadata, plain)
    assert line == ("c.safetensors was trained on digits with ambiguous=True; evaluated here with ambiguous=False "
                    "(another variant of the data)")
    same = data_flags.data_source(validate.parse_args(["--checkpoint", "c", "--digits-trainval", "1500",
                                                   "--digits-ambiguous"]), "digits")
    assert provenance.data_variant_mismatch("c.safetensors", metadata, same) is None
    assert provenance.data_variant_mismatch("c.safetensors", {}, plain) is None  # written before the record


def test_a_csv_set_edited_after_training_is_named() -> None:
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "train.csv"), "w") as handle:
            handle.write("image,labels\na.jpg,cat\n")
        source = DataSource("csv", root, {})
        trained = {"dataset": "csv", "options": {}, "files": provenance.label_files(source)}
        metadata = {"provenance": json.dumps(trained)}
        assert provenance.data_variant_mismatch("c.safetensors", metadata, source) is None
        with open(os.path.join(root, "train.csv"), "a") as handle:
            handle.write("b.jpg,dog\n")
        assert provenance.data_variant_mismatch("c.safetensors", metadata, source) == (
            "c.safetensors was trained on other contents of train.csv (their sha256 changed since)")
