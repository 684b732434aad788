import torch
from accelerate import Accelerator

from udtimm.engine import bare_model, first_nonfinite_term
from udtimm.model import create_model


def test_bare_model_strips_torch_compile_so_checkpoint_keys_stay_plain() -> None:
    model = create_model("test_resnet", num_classes=3, cal=True)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert any(key.startswith("_orig_mod.") for key in compiled.state_dict())
    bare = bare_model(Accelerator(cpu=True), compiled)
    assert bare is model and not any(key.startswith("_orig_mod.") for key in bare.state_dict())


def test_first_nonfinite_term_names_the_term() -> None:
    accelerator = Accelerator(cpu=True)
    terms = {"bce": torch.tensor(0.5), "partial_softmax": torch.tensor(float("nan")), "loss": torch.tensor(1.0)}
    assert first_nonfinite_term(terms, accelerator) == "partial_softmax"
    assert first_nonfinite_term({"loss": torch.tensor(1.0)}, accelerator) is None
