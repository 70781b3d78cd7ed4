"""Model adapters on small models of the real classes (random weights)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vlsae.errors import VlsaeError

from multimodal.adapters import adapter_usage, create_adapter, list_adapters

from .tiny import GRID, synthetic_pairs, tiny_clip_config


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    config = tiny_clip_config(tmp_path_factory.mktemp("clip"))
    return create_adapter(f"open_clip:{config}:random", device="cpu")


@pytest.fixture(scope="module")
def vit():
    return create_adapter("timm:vit_tiny_patch16_224:random", device="cpu", model_kwargs={"img_size": 32})


PAIRS = synthetic_pairs(5)


def test_registry_lists_every_adapter_and_names_valid_forms():
    names = list_adapters()
    assert {"open_clip", "timm", "shapes-clip"} <= set(names)
    assert all(adapter_usage()[n] for n in names)
    with pytest.raises(VlsaeError, match="did you mean 'open_clip'"):
        create_adapter("openclip:ViT-B-32")
    with pytest.raises(VlsaeError, match="valid forms"):
        create_adapter("nothing-like-this")


def test_clip_hook_points_cover_both_towers(clip):
    points = clip.hook_points()
    assert points[:3] == ["final", "visual.final", "text.final"]
    assert "visual.blocks.1" in points and "text.blocks.1" in points and "visual.blocks.2" not in points
    assert clip.parse_hook("final") == {"image": "final", "text": "final"}
    assert clip.parse_hook("visual.blocks.1,text.blocks.0") == {"image": "visual.blocks.1", "text": "text.blocks.0"}
    with pytest.raises(VlsaeError, match="valid hook points"):
        clip.parse_hook("visual.blocks.7")
    with pytest.raises(VlsaeError, match="two points for the image"):
        clip.parse_hook("visual.blocks.0,visual.blocks.1")


def test_clip_final_embeddings_match_open_clip(clip):
    out = clip.extract(PAIRS)
    assert out.keys == [p["key"] for p in PAIRS]
    assert out["image"].shape == (5, 24) and out["text"].shape == (5, 24)
    assert out.pair_index["image"].tolist() == list(range(5))
    with torch.no_grad():
        images = torch.stack([clip.preprocess(p["image"]) for p in PAIRS])
        text = clip.tokenizer([p["caption"] for p in PAIRS])
        torch.testing.assert_close(out["image"], clip.model.encode_image(images))
        torch.testing.assert_close(out["text"], clip.model.encode_text(text))


def test_clip_last_block_cls_tokens_pool_to_the_final_embeddings(clip):
    """Text 'cls' = the end-of-text token open_clip pools; image 'cls' = the class token."""
    model = clip.model
    text_cls = clip.extract(PAIRS, "text.blocks.1", "cls")["text"]
    image_cls = clip.extract(PAIRS, "visual.blocks.1", "cls")["image"]
    final = clip.extract(PAIRS)
    with torch.no_grad():
        torch.testing.assert_close(model.ln_final(text_cls) @ model.text_projection, final["text"])
        torch.testing.assert_close(model.visual.ln_post(image_cls) @ model.visual.proj, final["image"])


def test_clip_token_modes_row_counts_and_pair_index(clip):
    n = len(PAIRS)
    ids = clip.tokenizer([p["caption"] for p in PAIRS])
    words = [len(p["caption"].split()) for p in PAIRS]  # the tokenizer maps each of our words to one token
    eot = ids.argmax(dim=1)
    assert (eot - 1).tolist() == words

    patch = clip.extract(PAIRS, "visual.blocks.0", "patch")
    assert patch["image"].shape == (n * GRID, 32)
    assert torch.bincount(patch.pair_index["image"]).tolist() == [GRID] * n
    every = clip.extract(PAIRS, "visual.blocks.0", "all")
    assert every["image"].shape == (n * (GRID + 1), 32)

    text_patch = clip.extract(PAIRS, "text.blocks.0", "patch")
    assert torch.bincount(text_patch.pair_index["text"], minlength=n).tolist() == words
    text_all = clip.extract(PAIRS, "text.blocks.0", "all")
    assert torch.bincount(text_all.pair_index["text"], minlength=n).tolist() == [w + 2 for w in words]
    index = text_all.pair_index["text"]
    assert bool((index[1:] >= index[:-1]).all())

    mean = clip.extract(PAIRS, "visual.blocks.0,text.blocks.0", "mean")
    for modality, rows in (("image", patch), ("text", text_patch)):
        expected = torch.stack([rows[modality][rows.pair_index[modality] == i].mean(0) for i in range(n)])
        torch.testing.assert_close(mean[modality], expected)


def _assert_feature_map_hooks(adapter, n_blocks: int, expected) -> None:
    """``n_blocks`` image block hooks; for each (block, grid, width) of ``expected``, ``patch`` gives
    grid tokens of that width per pair, and ``widths`` agrees."""
    assert [p for p in adapter.hook_points() if p.startswith("visual.blocks.")] == [f"visual.blocks.{i}" for i in range(n_blocks)]
    n = len(PAIRS)
    for block, grid, width in expected:
        rows = adapter.extract(PAIRS, f"visual.blocks.{block}", "patch")
        assert rows["image"].shape == (n * grid, width)
        assert torch.bincount(rows.pair_index["image"]).tolist() == [grid] * n
        assert adapter.widths(f"visual.blocks.{block}") == {"image": width}


def test_clip_resnet_tower_blocks_are_feature_map_tokens(tmp_path):
    """An RN50-style tower (open_clip's ModifiedResNet): one hook per bottleneck block over the four
    stages, each position of its feature map a token; the last block's tokens are what the attention
    pool turns into the image embedding."""
    from open_clip.modified_resnet import ModifiedResNet

    config = tiny_clip_config(tmp_path, "vlsae-test-tiny-rn-clip",
                              {"image_size": 32, "layers": [1, 2, 1, 1], "width": 8, "head_width": 64})
    rn = create_adapter(f"open_clip:{config}:random", device="cpu")
    assert isinstance(rn.model.visual, ModifiedResNet)
    # 32x32 images: stem /4 -> 8x8 (stage 1), 4x4, 2x2, 1x1; widths 4x the stage width (8, 16, 32, 64)
    _assert_feature_map_hooks(rn, 5, ((0, 64, 32), (2, 16, 64), (4, 1, 256)))
    n = len(PAIRS)
    mean = rn.extract(PAIRS, "visual.blocks.2", "mean")["image"]
    patch = rn.extract(PAIRS, "visual.blocks.2", "patch")
    torch.testing.assert_close(mean, patch["image"].view(n, 16, 64).mean(1))
    with pytest.raises(VlsaeError, match="no class token"):
        rn.extract(PAIRS, "visual.blocks.0", "cls")
    last = rn.extract(PAIRS, "visual.blocks.4", "all")["image"]  # the 1x1 map: one token per image
    with torch.no_grad():
        pooled = rn.model.visual.attnpool(last.view(n, 1, 1, 256).permute(0, 3, 1, 2))
        torch.testing.assert_close(pooled, rn.extract(PAIRS)["image"])


def test_clip_convnext_trunk_stages_are_feature_map_tokens(tmp_path):
    """open_clip's ConvNeXt CLIPs (a timm trunk without ``blocks``): one hook per feature stage."""
    config = tiny_clip_config(tmp_path, "vlsae-test-tiny-convnext-clip",
                              {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                               "timm_proj": "linear", "image_size": 32})
    cnx = create_adapter(f"open_clip:{config}:random", device="cpu")
    # convnext_atto: stem /4 -> 8x8 at 40 channels, then 4x4 x 80, 2x2 x 160, 1x1 x 320
    _assert_feature_map_hooks(cnx, 4, ((0, 64, 40), (1, 16, 80), (3, 1, 320)))
    n = len(PAIRS)
    stage = cnx.extract(PAIRS, "visual.blocks.1", "all")["image"].view(n, 16, 80)
    with torch.no_grad():
        trunk = cnx.model.visual.trunk
        x = trunk.stages[1](trunk.stages[0](trunk.stem(cnx.prepare(PAIRS, ["image"]).inputs["image"])))
    torch.testing.assert_close(stage, x.flatten(2).transpose(1, 2))


def test_clip_final_hook_rejects_token_modes(clip):
    with pytest.raises(VlsaeError, match="--tokens cls"):
        clip.extract(PAIRS, "final", "patch")
    with pytest.raises(VlsaeError, match="unknown token selection"):
        clip.extract(PAIRS, "visual.blocks.0", "first")


def test_clip_widths(clip):
    assert clip.widths("final") == {"image": 24, "text": 24}
    assert clip.widths("visual.blocks.1,text.blocks.0") == {"image": 32, "text": 32}
    assert clip.widths("text.final") == {"text": 24}


def test_bf16_activations_are_close_to_fp32(tmp_path):
    config = tiny_clip_config(tmp_path, "vlsae-test-bf16")
    full = create_adapter(f"open_clip:{config}:random", device="cpu")
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in full.model.state_dict().items()}
    half = create_adapter(f"open_clip:{config}:random", device="cpu", dtype="bf16")
    half.model.load_state_dict(state)
    a, b = full.extract(PAIRS), half.extract(PAIRS)
    assert b["image"].dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(a["image"], b["image"].float(), dim=1)
    assert bool((cos > 0.98).all())


def test_clip_weights_file_round_trip(clip, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    again = create_adapter(f"open_clip:{clip.arch}:{weights}", device="cpu")
    torch.testing.assert_close(again.extract(PAIRS)["text"], clip.extract(PAIRS)["text"])


def test_missing_weights_are_one_line_errors(clip):
    with pytest.raises(VlsaeError, match="weights file not found"):
        create_adapter(f"open_clip:{clip.arch}:/no/such/file.safetensors")
    with pytest.raises(VlsaeError, match="no pretrained tag"):
        create_adapter(f"open_clip:{clip.arch}:laion2b")
    with pytest.raises(VlsaeError, match=r"not found locally.*open_clip:ViT-B-32:/path"):
        create_adapter("open_clip:ViT-B-32:laion2b_s34b_b79k")  # offline (conftest), not in the HF cache
    with pytest.raises(VlsaeError, match="has no architecture"):
        create_adapter("open_clip:ViT-B-33")
    with pytest.raises(VlsaeError, match=r"not found locally.*timm:vit_tiny_patch16_224:/path"):
        create_adapter("timm:vit_tiny_patch16_224")
    with pytest.raises(VlsaeError, match="timm has no model"):
        create_adapter("timm:vit_tinny_patch16_224")


def test_timm_vit_hooks(vit):
    assert vit.modalities == ("image",)
    points = vit.hook_points()
    assert points[:3] == ["final", "features", "blocks.0"] and "blocks.11" in points
    final = vit.extract(PAIRS)
    assert set(final.acts) == {"image"} and final["image"].shape == (5, 192)
    patches = vit.extract(PAIRS, "blocks.3", "patch")
    assert patches["image"].shape == (5 * 4, 192)  # 32x32 image, 16x16 patches
    cls = vit.extract(PAIRS, "features", "cls")
    with torch.no_grad():
        images = torch.stack([vit.transform(p["image"]) for p in PAIRS])
        torch.testing.assert_close(vit.model.forward_head(vit.model.forward_features(images), pre_logits=True),
                                   final["image"])
        torch.testing.assert_close(vit.model.forward_features(images)[:, 0], cls["image"])
    assert vit.widths("blocks.3") == {"image": 192}


def test_timm_weights_file_round_trip(vit, tmp_path):
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.model.state_dict().items()}, str(weights))
    again = create_adapter(f"timm:vit_tiny_patch16_224:{weights}", device="cpu", model_kwargs={"img_size": 32})
    torch.testing.assert_close(again.extract(PAIRS)["image"], vit.extract(PAIRS)["image"])


def test_timm_cnn_feature_maps_are_token_grids():
    cnn = create_adapter("timm:resnet18:random", device="cpu")
    assert "layer2" in cnn.hook_points()
    pairs = synthetic_pairs(2, size=64)
    grid = cnn.extract(pairs, "layer2", "patch")
    side = cnn.data_config["input_size"][1] // 8  # layer2 of a ResNet has stride 8
    assert grid["image"].shape[1] == 128 and torch.bincount(grid.pair_index["image"]).tolist() == [side * side] * 2
    mean = cnn.extract(pairs, "layer2", "mean")
    torch.testing.assert_close(mean["image"][1], grid["image"][grid.pair_index["image"] == 1].mean(0))
    with pytest.raises(VlsaeError, match="no class token"):
        cnn.extract(pairs, "layer2", "cls")


def test_vectorised_image_batch_equals_the_transform(clip):
    from multimodal.adapters.base import stack_images

    same_size = synthetic_pairs(4, size=32)
    batch = stack_images([p["image"] for p in same_size], clip.preprocess)
    assert torch.equal(batch, torch.stack([clip.preprocess(p["image"]) for p in same_size]))
    other = [p["image"] for p in synthetic_pairs(2, size=40)]  # needs a real resize: per-image path
    torch.testing.assert_close(stack_images(other, clip.preprocess), torch.stack([clip.preprocess(i) for i in other]))
