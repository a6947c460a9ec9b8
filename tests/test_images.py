"""Post-processing, CLIP preprocessing and PNG writing match diffusers/transformers."""

import numpy as np
import pytest
from PIL import Image

from runtime.files import write_new_file
from runtime.images import clip_preprocess, png_bytes, postprocess


@pytest.mark.parametrize("hw", [(256, 256), (64, 64), (512, 768), (200, 96)])
def test_clip_preprocess_matches_transformers(hw):
    # transformers without torchvision uses its PIL processor: the reference (DESIGN.md).
    CLIPImageProcessorPil = pytest.importorskip(  # noqa: N806
        "transformers.models.clip.image_processing_pil_clip").CLIPImageProcessorPil

    # v1-4's feature_extractor/preprocessor_config.json
    fe = CLIPImageProcessorPil(
        crop_size=224, do_center_crop=True, do_convert_rgb=True, do_normalize=True,
        do_resize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size=224)
    im = np.random.RandomState(0).randint(0, 256, (2, *hw, 3)).astype(np.uint8)
    ref = fe([Image.fromarray(x) for x in im], return_tensors="np").pixel_values
    ours = clip_preprocess(im)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(ours, ref)  # measured: bit-exact


def test_postprocess_matches_diffusers():
    torch = pytest.importorskip("torch")
    image_processor = pytest.importorskip("diffusers.image_processor")
    VaeImageProcessor = image_processor.VaeImageProcessor  # noqa: N806

    x = np.random.RandomState(1).uniform(-1.2, 1.2, (2, 3, 16, 24)).astype(np.float32)
    ref = VaeImageProcessor().postprocess(torch.from_numpy(x), output_type="np")
    ref = (ref * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
    np.testing.assert_array_equal(postprocess(x), ref)


def test_png_metadata_round_trip(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    path = write_new_file(tmp_path, "x", ".png", png_bytes(img, {"prompt": "a cat", "seed": "3"}))
    with Image.open(path) as im:
        assert im.text == {"prompt": "a cat", "seed": "3"}


def test_write_never_overwrites(tmp_path):
    a = write_new_file(tmp_path, "img", ".png", b"first")
    b = write_new_file(tmp_path, "img", ".png", b"second")
    assert (a.name, b.name) == ("img.png", "img-1.png")
    assert a.read_bytes() == b"first" and b.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img.png"]  # no temp left
