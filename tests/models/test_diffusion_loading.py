import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffcurate.models.diffusion import (
    DiffusionModel,
    ModelLoadError,
    load_diffusion_model,
    save_diffusion_model,
)
from diffcurate.models.reference import reference_model
from tiny_unets import tiny_cond_unet, tiny_vae

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def saved_tiny(tmp_path):
    model = reference_model("tiny", seed=3)
    return model, save_diffusion_model(model, tmp_path / "tiny")


def test_unet2d_round_trip_reproduces_outputs(saved_tiny):
    model, path = saved_tiny
    loaded = load_diffusion_model(path)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 250, 999])
    with torch.no_grad():
        assert torch.equal(model.unet.eval()(x, t).sample, loaded.unet(x, t).sample)
    assert type(loaded.unet).__name__ == "UNet2DModel"
    assert not loaded.conditional and loaded.vae is None and loaded.path == path
    assert loaded.sample_shape == (1, 8, 8)
    assert torch.equal(loaded.scheduler.betas, model.scheduler.betas)
    # The unconditional layout doubles as a diffusers DDPMPipeline directory.
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"


def test_conditional_unet_and_vae_round_trip(tmp_path):
    model = DiffusionModel(
        unet=tiny_cond_unet(seed=1).float(),
        scheduler=DDPMScheduler(prediction_type="v_prediction"),
        vae=tiny_vae(seed=2).float(),
    )
    path = save_diffusion_model(model, tmp_path / "cond")
    loaded = load_diffusion_model(path)
    assert loaded.conditional and type(loaded.unet).__name__ == "UNet2DConditionModel"
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 3, 6, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = model.unet.eval()(x, t, encoder_hidden_states=cond).sample
        assert torch.equal(expected, loaded.unet(x, t, encoder_hidden_states=cond).sample)
        assert torch.equal(model.vae.eval()(x).sample, loaded.vae(x).sample)


def test_pipeline_dir_with_another_scheduler_loads_as_ddpm(saved_tiny, tmp_path):
    _, path = saved_tiny
    pipe = tmp_path / "pipe"
    shutil.copytree(path, pipe)
    shutil.rmtree(pipe / "scheduler")
    DDIMScheduler(beta_end=0.03).save_pretrained(pipe / "scheduler")
    loaded = load_diffusion_model(pipe)
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert loaded.scheduler.config.beta_end == 0.03


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist") as err:
        load_diffusion_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


@pytest.mark.parametrize("component", ["unet", "scheduler"])
def test_missing_component_dir(saved_tiny, component):
    _, path = saved_tiny
    shutil.rmtree(path / component)
    with pytest.raises(ModelLoadError, match=rf"missing {component}/") as err:
        load_diffusion_model(path)
    assert str(path) in str(err.value)


def test_missing_weights_file(saved_tiny):
    _, path = saved_tiny
    (path / "unet" / WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match=r"no weights file in .*unet") as err:
        load_diffusion_model(path)
    assert "cannot load" not in str(err.value)


def test_float64_and_variant_only_weights(saved_tiny, tmp_path):
    model, _ = saved_tiny
    fp16_only = tmp_path / "fp16"
    save_diffusion_model(model, fp16_only)
    (fp16_only / "unet" / WEIGHTS).unlink()
    model.unet.half().save_pretrained(fp16_only / "unet", variant="fp16")
    model.unet.float()
    loaded = load_diffusion_model(fp16_only, dtype=torch.float64)
    assert next(loaded.unet.parameters()).dtype == torch.float64
    for name, param in model.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], param.half().double())
    with pytest.raises(ModelLoadError, match=r"no 'bf16' weights"):
        load_diffusion_model(fp16_only, variant="bf16")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights(saved_tiny, damage):
    _, path = saved_tiny
    weights = path / "unet" / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00junk" * 50)
    with pytest.raises(ModelLoadError, match=r"cannot load UNet2DModel weights from .*unet"):
        load_diffusion_model(path)


def test_weights_of_another_architecture(saved_tiny, tmp_path):
    _, path = saved_tiny
    other = save_diffusion_model(reference_model("digits-8px"), tmp_path / "big")
    shutil.copy(other / "unet" / WEIGHTS, path / "unet" / WEIGHTS)
    with pytest.raises(ModelLoadError, match=r"size mismatch"):
        load_diffusion_model(path)


@pytest.mark.parametrize("name", ["UNet3DConditionModel", "NotAModel", None])
def test_unknown_unet_class_name(saved_tiny, name):
    _, path = saved_tiny
    cfg_path = path / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = name
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=rf"unsupported _class_name {name!r}") as err:
        load_diffusion_model(path)
    assert "UNet2DModel" in str(err.value) and "config.json" in str(err.value)


def test_model_index_disagreeing_with_component(saved_tiny):
    _, path = saved_tiny
    index = json.loads((path / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"says unet is UNet2DConditionModel"):
        load_diffusion_model(path)


def test_invalid_json_config(saved_tiny):
    _, path = saved_tiny
    (path / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"scheduler_config.json is not valid JSON"):
        load_diffusion_model(path)


def test_save_refuses_non_empty_dir(saved_tiny):
    model, path = saved_tiny
    with pytest.raises(FileExistsError, match="non-empty"):
        save_diffusion_model(model, path)
