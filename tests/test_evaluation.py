"""The evaluation harness: ground-truth predictions score 100, empty ones 0, bad output is named."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiber.data.evaluation import evaluate, load_image_rgb
from fiber.data.formats import DataFormatError, load_detection, load_grounding
from fiber.data.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Dets:
    boxes: np.ndarray
    scores: np.ndarray
    phrase_index: np.ndarray


EMPTY = Dets(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev") / "d"
    generate(SynthConfig(images=8, seed=11, sizes=((192, 160), (160, 192))), root)
    return load_grounding(root / "grounding.json"), load_detection(root / "detection.json")


def _oracle(grounding, detection, shift=0.0):
    """A predict() that looks the ground truth up by (image bytes, prompt); ``shift`` moves every
    box right by that fraction of its width."""
    table = {}
    for s in grounding:
        key = (load_image_rgb(s.image).tobytes(), s.caption)
        table[key] = [(p.boxes, i) for i, p in enumerate(s.phrases)]
    det_prompt = ". ".join(detection.category_names)  # the protocol: all names, sorted ids
    ids = [c for c, _ in detection.categories]
    for im in detection:
        key = (load_image_rgb(im.image).tobytes(), det_prompt)
        table[key] = [(im.boxes[im.category_ids == c], ids.index(c)) for c in ids]

    def predict(image, prompt, phrase_spans):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        rows = table[(image.tobytes(), prompt)]
        assert len(rows) == len(phrase_spans)
        boxes = np.concatenate([b for b, _ in rows]).astype(np.float32)
        boxes[:, [0, 2]] += shift * (boxes[:, 2:3] - boxes[:, 0:1])
        index = np.concatenate([np.full(len(b), i, np.int32) for b, i in rows])
        return Dets(boxes, np.linspace(1, 0.5, len(boxes), dtype=np.float32), index)

    return predict


def test_ground_truth_predictions_score_100(data):
    grounding, detection = data
    out = evaluate(_oracle(grounding, detection), grounding, detection)
    for key in ("R@1", "R@5", "R@10", "R@1_relation", "R@1_no_relation", "refexp",
                "refexp_relation", "mAP", "AP50", "AP75"):
        assert out[key] == pytest.approx(100.0), key
    assert out["phrases"] == out["phrases_relation"] + out["phrases_no_relation"]
    assert out["phrases_relation"] > 0 and out["refexps"] > 0 and out["detection_images"] == 8
    boxed = sum(len(p.boxes) > 0 for s in grounding for p in s.phrases)
    assert out["phrases"] == boxed


def test_empty_and_wrong_predictions_score_0(data):
    grounding, detection = data
    out = evaluate(lambda image, prompt, spans: EMPTY, grounding, detection)
    for key in ("R@1", "R@10", "R@1_relation", "refexp", "mAP"):
        assert out[key] == 0.0, key
    # every box moved by 3/4 of its width: IoU 1/7 < 0.5 (overlapping objects aside, a miss)
    out = evaluate(_oracle(grounding, detection, shift=0.75), grounding, detection)
    assert out["R@1"] < 20 and out["mAP"] < 10


def test_limit_and_paths(data):
    grounding, detection = data
    out = evaluate(lambda image, prompt, spans: EMPTY, grounding.path, detection.path, limit=3,
                   progress=lambda items, desc: items)
    assert out["detection_images"] == 3 and out["phrases"] <= 3 * 5


def test_bad_predict_output_is_named(data):
    grounding, _ = data
    bad = Dets(np.zeros((1, 4), np.float32), np.ones(1, np.float32), np.array([99]))
    with pytest.raises(ValueError, match=r"phrase_index outside .* grounding entry 0"):
        evaluate(lambda image, prompt, spans: bad, grounding)
    short = Dets(np.zeros((2, 4), np.float32), np.ones(1, np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="2 boxes, 1 scores"):
        evaluate(lambda image, prompt, spans: short, grounding)
    with pytest.raises(ValueError, match="needs a grounding or a detection"):
        evaluate(lambda image, prompt, spans: EMPTY)


def test_load_image_rgb(tmp_path):
    Image.new("RGBA", (5, 3), (10, 20, 30, 0)).save(tmp_path / "a.png")
    Image.new("L", (4, 2), 7).save(tmp_path / "g.png")
    a, g = load_image_rgb(tmp_path / "a.png"), load_image_rgb(tmp_path / "g.png")
    assert a.shape == (3, 5, 3) and a.dtype == np.uint8 and tuple(a[0, 0]) == (10, 20, 30)
    assert g.shape == (2, 4, 3) and tuple(g[1, 3]) == (7, 7, 7)
    with pytest.raises(DataFormatError, match="not found"):
        load_image_rgb(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataFormatError, match="cannot decode"):
        load_image_rgb(tmp_path / "junk.png")


def test_load_image_rgb_applies_the_exif_rotation_as_the_runtime(tmp_path):
    """A photo stored 8 x 4 with EXIF orientation 6 (rotate 90 CW to display) decodes upright,
    4 x 8, exactly as runtime.sources.read_image gives it to the Detector."""
    from runtime.sources import read_image

    img = Image.new("RGB", (8, 4), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))  # stored top-left -> displayed top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.png", exif=exif)
    got = load_image_rgb(tmp_path / "rot.png")
    assert got.shape == (8, 4, 3) and tuple(got[0, 3]) == (255, 0, 0) and tuple(got[0, 0]) == (0, 0, 0)
    assert np.array_equal(got, read_image(tmp_path / "rot.png")) and got.flags.c_contiguous
