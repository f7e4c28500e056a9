"""Encoders load as their weights were trained, and a download that cannot happen is one clear line.

The real-size open_clip models are built on torch's meta device (shapes and modules, no memory, no
weights): what is checked is the architecture and the preprocessing the loader builds for a (model,
tag) pair, through the same `load_open_clip` the stages call."""
import json
import logging
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

from core.errors import PipelineError
from core.open_clip_models import TINY_CONFIGS, load_open_clip, save_open_clip_folder

LAION = "laion2b_s32b_b82k"


def block_activations(model) -> list[type]:
    """The MLP activation of every transformer block, image and text towers."""
    blocks = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
    return [type(b.mlp.gelu) for b in blocks]


def build_on_meta(model: str, tag: str, **kwargs):
    with torch.device("meta"):
        return load_open_clip(model, tag, device="meta", **kwargs)


def mismatch_reports(caught, caplog) -> list[str]:
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return [s for s in said if "QuickGELU" in s or "mismatch" in s.lower()]


def test_openai_vit_l_14_uses_quick_gelu_in_every_block():
    clip, _, preprocess, _ = build_on_meta("ViT-L-14", "openai", load_weights=False)
    acts = block_activations(clip)
    assert len(acts) == 24 + 12  # image and text towers
    assert set(acts) == {QuickGELU}
    normalize = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(normalize.mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # OpenAI's mean, from the tag


def test_laion_vit_l_14_uses_gelu_and_its_own_normalisation():
    clip, _, preprocess, _ = build_on_meta("ViT-L-14", LAION, load_weights=False)
    assert set(block_activations(clip)) == {torch.nn.GELU}
    normalize = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.5, 0.5, 0.5)


def test_loading_a_tag_raises_no_open_clip_mismatch_warning(tmp_path, monkeypatch, caplog):
    """The full loading path with the download and the weight copy stood in for: open_clip itself,
    given the tag, warns and builds GELU; the project's loader builds QuickGELU and nothing warns."""
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"")
    loaded = []
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda cfg, **k: str(weights))
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **k: str(weights))
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda model, path, **k: loaded.append(path))
    caplog.set_level(logging.WARNING)

    with warnings.catch_warnings(record=True) as caught, torch.device("meta"):
        warnings.simplefilter("always")
        plain = open_clip.create_model("ViT-L-14", pretrained="openai", device="meta")
    assert mismatch_reports(caught, caplog) and set(block_activations(plain)) == {torch.nn.GELU}  # what went wrong

    caplog.clear()
    loaded.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip, _, _, _ = build_on_meta("ViT-L-14", "openai")
    assert loaded == [str(weights)]  # the weights go in, through open_clip's own loader
    assert mismatch_reports(caught, caplog) == []
    assert set(block_activations(clip)) == {QuickGELU}


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_a_saved_folder_loads_back_with_the_activation_it_was_built_with(tmp_path, quick_gelu):
    model_cfg, preprocess_cfg = json.loads(json.dumps(TINY_CONFIGS["clip"]))
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg, quick_gelu=quick_gelu).eval()
    # the config handed over does not say which activation was built: the folder records it anyway
    folder = save_open_clip_folder(model, model_cfg, {**preprocess_cfg, "size": 32}, tmp_path / "clip")
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is quick_gelu
    loaded, _, _, _ = load_open_clip(str(folder), None)
    assert set(block_activations(loaded)) == {QuickGELU if quick_gelu else torch.nn.GELU}
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(image), model.encode_image(image))


def test_an_unknown_tag_is_one_line_naming_model_tag_and_the_folder_setting():
    with pytest.raises(PipelineError) as err:
        load_open_clip("ViT-L-14", "no_such_tag")
    message = str(err.value)
    assert "'ViT-L-14'" in message and "'no_such_tag'" in message and "openai" in message  # the tags there are
    assert "clip.model=/path/to/folder" in message and "\n" not in message


def test_a_failed_download_is_one_line_naming_model_tag_and_the_folder_setting(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(PipelineError) as err:
        load_open_clip("ViT-SO400M-14-SigLIP-384", "webli", setting="siglip.model")
    message = str(err.value)
    assert "'ViT-SO400M-14-SigLIP-384'" in message and "'webli'" in message
    assert "siglip.model=/path/to/folder" in message and "\n" not in message


def test_a_qwen_hub_name_that_cannot_download_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from qwen3_finetune.model import load_backbone, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for load in (load_tokenizer, lambda name: load_backbone(name, "none", torch.device("cpu"))):
        with pytest.raises(PipelineError) as err:
            load("Qwen/Qwen3-Embedding-0.6B")
        message = str(err.value)
        assert "'Qwen/Qwen3-Embedding-0.6B'" in message and "qwen.model=/path/to/folder" in message
        assert "\n" not in message
