import pytest
import torch
from safetensors.torch import save_file

from udtimm.model import CalibratedModel, ModelConfigError, create_model
from udtimm.settings import ModelSettings

FAMILIES = [
    ("resnet18", {}),
    ("vgg19_bn", {}),
    ("mobilenetv2_100", {}),
    ("efficientnet_b0", {}),
    ("convnext_atto", {}),
    ("mobilenetv3_small_050", {}),
    ("test_vit", {"global_pool": "avg"}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), FAMILIES)
def test_families_give_feature_map_and_both_branches(name: str, options: dict) -> None:
    model = create_model(ModelSettings(name, **options), 7, cal=True, img_size=32).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 7) and out.cal_logits.shape == (2, 7)
    grid = model.feature_grid(out.features)
    assert grid.ndim == 4 and grid.shape[0] == 2
    # The classification branch is timm's own classifier: the backbone alone gives the same logits.
    torch.testing.assert_close(model.backbone(torch.zeros(1, 3, 32, 32)), model(torch.zeros(1, 3, 32, 32)).logits)
    # The calibration branch reads the pooled pre-logits features, whose width can differ from the map's.
    assert model.cal_head[0].in_features == model.backbone.forward_head(out.features, pre_logits=True).shape[1]


def test_calibration_branch_is_linear_bn_relu_linear_of_width_512() -> None:
    model = create_model(ModelSettings("test_resnet"), 5, cal=True)
    layers = [type(layer).__name__ for layer in model.cal_head]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model.cal_head[0].out_features == 512 and model.cal_head[3].out_features == 5


def test_without_cal_there_is_no_calibration_output() -> None:
    model = create_model(ModelSettings("test_resnet"), 5)
    assert not model.has_cal and model(torch.randn(2, 3, 32, 32)).cal_logits is None


def test_global_pool_is_passed_to_timm() -> None:
    model = create_model(ModelSettings("resnet18", global_pool="max"), 3).eval()
    features = torch.randn(1, 512, 2, 2)
    pooled = model.backbone.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, features.amax(dim=(2, 3)))


def test_vit_tokens_become_a_grid_without_prefix_tokens() -> None:
    model = create_model(ModelSettings("test_vit", global_pool="avg"), 3, img_size=32)
    tokens = torch.arange(2 * (model.num_prefix_tokens + 16) * 4, dtype=torch.float32).view(2, -1, 4)
    grid = model.feature_grid(tokens)
    assert grid.shape == (2, 4, 4, 4)
    torch.testing.assert_close(grid[0, :, 0, 0], tokens[0, model.num_prefix_tokens])


def test_unknown_model_lists_close_names() -> None:
    with pytest.raises(ModelConfigError, match="resnet18"):
        create_model(ModelSettings("resnet181"), 3)


def test_pretrained_without_network_points_to_pretrained_path() -> None:
    with pytest.raises(ModelConfigError, match="--pretrained-path"):
        create_model(ModelSettings("test_resnet", pretrained=True), 3)


def test_pretrained_path_loads_local_weights_and_replaces_the_classifier(tmp_path) -> None:
    source = create_model(ModelSettings("test_resnet"), 1000)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    model = create_model(ModelSettings("test_resnet", pretrained_path=str(path)), 4)
    assert isinstance(model, CalibratedModel) and model.backbone.get_classifier().out_features == 4
    loaded, saved = model.backbone.state_dict(), source.backbone.state_dict()
    first_key = next(iter(saved))
    torch.testing.assert_close(loaded[first_key], saved[first_key])


def test_missing_pretrained_path_names_the_file(tmp_path) -> None:
    with pytest.raises(ModelConfigError, match="missing.safetensors"):
        create_model(ModelSettings("test_resnet", pretrained_path=str(tmp_path / "missing.safetensors")), 3)


def test_model_kwargs_reach_timm_and_the_checkpoint(tmp_path) -> None:
    from udtimm.checkpoint import model_from_checkpoint, model_metadata, save_checkpoint

    model = create_model(ModelSettings("test_resnet", model_kwargs={"output_stride": 16}), 3, cal=True)
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[-2:] == (4, 4)  # stride 32 gives 2 x 2
    path = str(tmp_path / "os16.safetensors")
    save_checkpoint(path, model, model_metadata("test_resnet", model, ["a", "b", "c"], None, 64, [0.5] * 3, [0.5] * 3,
                                                model_kwargs={"output_stride": 16}))
    rebuilt, _ = model_from_checkpoint(path)
    assert rebuilt.forward_features(torch.randn(1, 3, 64, 64)).shape[-2:] == (4, 4)
    with pytest.raises(ModelConfigError, match="does not take --model-kwargs"):
        create_model(ModelSettings("test_resnet", model_kwargs={"no_such_argument": 1}), 3)
    with pytest.raises(ModelConfigError, match="own flags"):
        create_model(ModelSettings("test_resnet", model_kwargs={"num_classes": 5}), 3)


def test_model_kwargs_flag_parses_yaml_scalars() -> None:
    import train

    args = train.parse_args(["--model-kwargs", "output_stride=16", "drop_path_rate=0.1", "act_layer=relu"])
    assert args.model_kwargs == {"output_stride": 16, "drop_path_rate": 0.1, "act_layer": "relu"}
    assert train.parse_args([]).model_kwargs == {}
    with pytest.raises(SystemExit):
        train.parse_args(["--model-kwargs", "output_stride"])
