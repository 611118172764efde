"""Training augmentation: torchvision's random resized crop and flip, on ImageProcessor's code."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import embedkit
from embedkit import ImageProcessor
from embedkit.errors import InvalidAugmentError
from embedkit.finetuning.augment import Augmenter, ImageAugment, View, sample_view
from embedkit.inputs.image import probe_images
from embedkit.inputs.items import ItemFailure

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "hymenoptera" / "val"

PRE = embedkit.ImagePreprocess(crop=(64, 48), resize=72)


def test_defaults_are_torchvision_s():
    augment = ImageAugment()
    assert augment.scale == (0.08, 1.0) and augment.ratio == (3 / 4, 4 / 3) and augment.flip == 0.5
    assert ImageAugment.from_json(augment.to_json()) == augment


def test_views_are_deterministic_for_a_seed_and_differ_between_seeds():
    image = probe_images(1)[0]
    augmenter = Augmenter(PRE)
    a = [augmenter.view(image, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and a[0][1] == a[1][1]
    others = {augmenter.view(image, np.random.default_rng(seed))[1] for seed in range(8)}
    assert len(others) == 8
    assert a[0][0].shape == (3, 64, 48) and a[0][0].dtype == np.float32


@pytest.mark.parametrize("width,height", [(320, 240), (240, 320), (500, 180), (64, 64)])
def test_crop_parameters_lie_within_the_declared_ranges(width, height):
    augment = ImageAugment(scale=(0.2, 0.6), ratio=(0.8, 1.25), flip=0.3)
    rng = np.random.default_rng(0)
    views = [sample_view(width, height, augment, rng) for _ in range(400)]
    sampled = [v for v in views if (v.width, v.height) != (width, height)]
    for v in views:
        assert 0 <= v.left and v.left + v.width <= width and 0 <= v.top and v.top + v.height <= height
    for v in sampled:  # rounding to whole pixels moves area and ratio by less than one pixel's worth
        area = v.width * v.height / (width * height)
        assert 0.2 - (v.width + v.height + 1) / (width * height) <= area <= 0.6 + (v.width + v.height + 1) / (width * height)
        assert 0.8 * (1 - 1.5 / v.height) <= v.width / v.height <= 1.25 * (1 + 1.5 / v.height)
    flips = sum(v.flip for v in views) / len(views)
    assert 0.24 <= flips <= 0.36
    assert len(sampled) >= 390  # the fallback is rare at these sizes


def test_fallback_is_the_centre_crop_within_the_ratio():
    # A 1000x10 strip: no crop of 8..100 % of its area has a ratio in 3/4..4/3.
    view = sample_view(1000, 10, ImageAugment(flip=0.0), np.random.default_rng(0))
    assert view == View(left=(1000 - 13) // 2, top=0, width=13, height=10, flip=False)


def test_the_view_is_processor_pixels_of_that_region():
    image = probe_images(1)[0]
    augmenter = Augmenter(PRE, ImageAugment(flip=1.0))
    pixels, view = augmenter.view(image, np.random.default_rng(3))
    assert view.flip
    # The same region cut out first, then resized to the whole crop by the inference code path.
    region = np.ascontiguousarray(image[view.top:view.top + view.height, view.left:view.left + view.width])
    whole = embedkit.ImagePreprocess(crop=(64, 48), resize=64)
    processor = ImageProcessor(whole)
    expected = processor.pixels(processor.decode(region), (0, 0, view.width, view.height))
    np.testing.assert_allclose(pixels, expected[:, :, ::-1], atol=1e-4)
    # Mirrored: the unflipped view of the same draw is its mirror image.
    unflipped = Augmenter(PRE, ImageAugment(flip=0.0)).view(image, np.random.default_rng(3))[0]
    assert np.array_equal(pixels, unflipped[:, :, ::-1])


def test_augmentation_off_gives_the_inference_pixels_exactly():
    photos = sorted(HYMENOPTERA.glob("*/*.jpg"))[:3] if HYMENOPTERA.is_dir() else []
    rgba = np.dstack([probe_images(1)[0], np.linspace(0, 255, 240 * 320).reshape(240, 320).astype(np.uint8)])
    grey16 = (np.arange(200 * 300).reshape(200, 300) % 65536).astype(np.uint16)
    processor = ImageProcessor(PRE)
    augmenter = Augmenter(PRE, None)
    for item in [*photos, *probe_images(3), rgba, grey16]:
        pixels, view = augmenter.view(item, np.random.default_rng(0))
        assert view is None and pixels.tobytes() == processor(item)[0].tobytes()


def test_bad_items_are_the_processor_s_item_failures():
    with pytest.raises(ItemFailure) as info:
        Augmenter(PRE)(b"not an image", np.random.default_rng(0))
    assert info.value.code == "not_an_image"


@pytest.mark.parametrize("fields,says", [
    ({"scale": (0.0, 1.0)}, "scale"), ({"scale": (0.5, 0.2)}, "scale"), ({"scale": (0.5, 1.5)}, "scale"),
    ({"ratio": (0, 1)}, "ratio"), ({"ratio": (2.0, 1.0)}, "ratio"), ({"ratio": (1.0, math.inf)}, "ratio"),
    ({"flip": 1.5}, "flip"), ({"flip": True}, "flip"), ({"scale": 0.5}, "scale"),
])
def test_bad_settings_are_typed_errors(fields, says):
    with pytest.raises(InvalidAugmentError) as info:
        ImageAugment(**fields)
    assert str(info.value).startswith(says) and isinstance(info.value, ValueError)


def test_exported_at_the_top_level():
    assert embedkit.ImageAugment is ImageAugment and embedkit.InvalidAugmentError is InvalidAugmentError
    assert issubclass(embedkit.InvalidUnfreezeError, ValueError) and issubclass(embedkit.NoBlocksError, ValueError)
