"""The torch-free model check agrees with the loader: every form that loads passes it, and every
form it refuses the loader refuses too (it runs first, so a disagreement would refuse a valid
model or let a bad one through to a slow failure)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffcurate.models.diffusion import ModelLoadError, load_diffusion_model
from diffcurate.models.model_files import check_model_files
from tiny_pipelines import original_checkpoint, save_tiny_sd_pipeline
from workspaces import save_tiny_unet_model


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """Every way a user holds a model, as (path, check/load keyword arguments)."""
    root = tmp_path_factory.mktemp("forms")
    sd = save_tiny_sd_pipeline(root / "sd", seed=0)
    model = load_diffusion_model(sd)
    nets = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder.model}
    fp16_both = shutil.copytree(sd, root / "fp16-both")
    fp16_only = root / "fp16-only"
    for name, net in nets.items():
        copy.deepcopy(net).half().save_pretrained(fp16_both / name, variant="fp16")
    shutil.copytree(fp16_both, fp16_only)
    for name in nets:
        for f in (fp16_only / name).glob("*.safetensors"):
            if ".fp16." not in f.name:
                f.unlink()
    state = original_checkpoint(model)
    save_file(state, str(root / "model.safetensors"))
    torch.save({"state_dict": state}, root / "model.ckpt")
    from peft import LoraConfig

    unet = copy.deepcopy(model.unet)
    unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    unet.save_lora_adapter(root / "lora")
    return {
        "pixel-dir": (save_tiny_unet_model(root / "pixel"), {}),
        "sd-dir": (sd, {}),
        "fp16-variant": (fp16_both, {"variant": "fp16"}),
        "fp16-only": (fp16_only, {"variant": "fp16"}),
        "fp16-only-auto": (fp16_only, {}),
        "single-safetensors": (root / "model.safetensors", {"config": sd}),
        "single-ckpt": (root / "model.ckpt", {"config": sd}),
        "lora": (sd, {"lora": [root / "lora"]}),
        "root": root,
    }


VALID = [
    "pixel-dir", "sd-dir", "fp16-variant", "fp16-only", "fp16-only-auto", "single-safetensors",
    "single-ckpt", "lora",
]  # fmt: skip


@pytest.mark.parametrize("form", VALID)
def test_every_form_that_loads_passes(forms, form):
    path, kwargs = forms[form]
    check_model_files(path, **kwargs)
    loaded = load_diffusion_model(path, **kwargs)
    assert loaded.path == path


def _bad_forms(forms, tmp_path):
    root, sd = forms["root"], forms["sd-dir"][0]
    no_unet = tmp_path / "no-unet"
    shutil.copytree(sd / "scheduler", no_unet / "scheduler")
    no_weights = shutil.copytree(sd, tmp_path / "no-weights")
    for f in (no_weights / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    (tmp_path / "model.pt").write_bytes(b"x")
    return {
        "missing": (tmp_path / "nope", {}, r"nope.* \(expected a diffusers directory or a "),
        "no-unet": (no_unet, {}, r"missing unet/"),
        "no-unet-weights": (no_weights, {}, r"no weights file in .*unet"),
        "no-such-variant": (sd, {"variant": "bf16"}, r"no 'bf16' weights in .*unet"),
        "bad-suffix": (tmp_path / "model.pt", {"config": sd}, r"not a checkpoint"),
        "single-without-config": (root / "model.safetensors", {}, r"needs --model-config DIR"),
        "config-for-a-dir": (sd, {"config": sd}, r"only for single-file"),
        "missing-lora": (sd, {"lora": [tmp_path / "no-lora"]}, r"LoRA adapter .*no-lora"),
    }


@pytest.mark.parametrize(
    "form",
    ["missing", "no-unet", "no-unet-weights", "no-such-variant", "bad-suffix",
     "single-without-config", "config-for-a-dir", "missing-lora"],
)  # fmt: skip
def test_what_it_refuses_the_loader_refuses(forms, tmp_path, form):
    path, kwargs, match = _bad_forms(forms, tmp_path)[form]
    with pytest.raises(ModelLoadError, match=match) as fast:
        check_model_files(path, **kwargs)
    assert "\n" not in str(fast.value)
    with pytest.raises(ModelLoadError, match=match):
        load_diffusion_model(path, **kwargs)


def test_the_check_imports_no_torch():
    code = (
        "import sys\n"
        "import diffcurate.cli, diffcurate.cli.checks, diffcurate.models.model_files\n"
        "heavy = [m for m in ('torch', 'prefect', 'diffusers', 'lancedb') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""
