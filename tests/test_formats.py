"""Dataset readers (round trip of the generator's files, real MDETR layouts, malformed input)
and detection prompts."""
import json

import numpy as np
import pytest

from fiber.data.formats import DataFormatError, load_detection, load_grounding, load_pairs
from fiber.data.prompts import build_detection_prompt, parse_prompt, sample_detection_prompt
from fiber.data.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt") / "d"
    generate(SynthConfig(images=6, seed=3, sizes=((192, 160), (160, 192))), root)
    return root


def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def test_grounding_round_trip(root):
    raw = json.loads((root / "grounding.json").read_text())
    ds = load_grounding(root / "grounding.json")
    assert len(ds) == len(raw["images"]) and ds.image_root == root
    for s, e in zip(ds, raw["images"]):
        assert (s.id, s.caption, s.task, s.has_relation) == (e["id"], e["caption"], e["task"],
                                                             e["has_relation"])
        assert s.image == root / e["file_name"] and s.image.is_file()
        assert [[list(sp) for sp in p.spans] for p in s.phrases] == e["tokens_positive_eval"]
        for p, phrase in enumerate(s.phrases):
            want = [_xyxy(a["bbox"]) for a in raw["annotations"]
                    if a["image_id"] == e["id"] and a["phrase_ids"] == p]
            assert phrase.boxes.dtype == np.float32 and phrase.boxes.shape == (len(want), 4)
            np.testing.assert_allclose(phrase.boxes, np.asarray(want).reshape(-1, 4), atol=1e-4)
            assert phrase.text == " ".join(s.caption[a:b] for a, b in phrase.spans)


def test_detection_and_pairs_round_trip(root):
    raw = json.loads((root / "detection.json").read_text())
    ds = load_detection(root / "detection.json")
    assert len(ds) == 6 and ds.category_names == [c["name"] for c in raw["categories"]]
    coco = ds.to_coco()
    assert [a["id"] for a in coco["annotations"]] == [a["id"] for a in raw["annotations"]]
    for got, want in zip(coco["annotations"], raw["annotations"]):
        np.testing.assert_allclose(got["bbox"], want["bbox"], atol=1e-4)
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
    pairs = load_pairs(root / "pairs.jsonl")
    assert len(pairs) == 6 and all(p.image.is_file() for p in pairs)


def _write(tmp_path, obj, name="g.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _grounding(caption="a red star and a blue ring", anns=None, **entry):
    image = {"id": 7, "file_name": "x.png", "width": 100, "height": 80, "caption": caption}
    image.update(entry)
    if anns is None:
        anns = [{"id": 3, "image_id": 7, "bbox": [10, 10, 20, 20], "tokens_positive": [[2, 10]]}]
    return {"images": [image], "annotations": anns}


def test_real_mdetr_flickr_layout(tmp_path):
    """Flickr separateGT: string sizes, only boxed phrases in tokens_positive_eval, a box shared by
    two phrases (equivalent entities), no task field."""
    cap = "a man and his dog play with a ball"
    entry = {"id": 0, "file_name": "1.jpg", "height": "80", "width": "100", "caption": cap,
             "dataset_name": "flickr", "tokens_positive_eval": [[[0, 5]], [[10, 17]], [[28, 34]]]}
    anns = [{"id": 1, "image_id": 0, "bbox": [1, 2, 30, 40], "tokens_positive": [[0, 5]]},
            {"id": 2, "image_id": 0, "bbox": [50, 50, 10, 10], "tokens_positive": [[10, 17], [28, 34]]},
            {"id": 3, "image_id": 0, "bbox": [60, 0, 40.5, 20], "tokens_positive": [[0, 5]]}]
    ds = load_grounding(_write(tmp_path, {"images": [entry], "annotations": anns}), image_root="/imgs")
    (s,) = ds.samples
    assert (s.width, s.height, s.task, s.has_relation) == (100, 80, "caption", False)
    assert str(s.image) == "/imgs/1.jpg"
    assert [p.text for p in s.phrases] == ["a man", "his dog", "a ball"]
    np.testing.assert_allclose(s.phrases[0].boxes, [[1, 2, 31, 42], [60, 0, 100, 20]])  # clipped 0.5
    np.testing.assert_allclose(s.phrases[1].boxes, [[50, 50, 60, 60]])
    np.testing.assert_allclose(s.phrases[2].boxes, [[50, 50, 60, 60]])


def test_real_mdetr_refcoco_layout(tmp_path):
    entry = {"id": 4, "file_name": "c.jpg", "height": 80, "width": 100, "dataset_name": "refcoco",
             "caption": "man on the left in red"}
    anns = [{"id": 9, "image_id": 4, "bbox": [0, 0, 10, 20], "tokens_positive": [[0, 3]],
             "category_id": 1}]
    (s,) = load_grounding(_write(tmp_path, {"images": [entry], "annotations": anns})).samples
    assert s.task == "refexp" and len(s.phrases) == 1 and s.phrases[0].text == "man"
    np.testing.assert_allclose(s.phrases[0].boxes, [[0, 0, 10, 20]])


@pytest.mark.parametrize("payload, message", [
    ("", "empty file"),
    ('{"images": [', "malformed JSON at line 1"),
    ("[]", "expected a JSON object"),
    ({"images": []}, "'images' is empty"),
    (_grounding(caption=None), "images[0] (id 7): 'caption' must be str"),
    ({"images": [{"id": 7, "file_name": "x", "width": 5, "height": 5}], "annotations": []},
     "images[0] (id 7): missing 'caption'"),
    (_grounding(anns=[{"id": 3, "image_id": 7, "bbox": [0, 0, 5, 5], "tokens_positive": [[20, 40]]}]),
     "annotations[0] (id 3): span [20, 40] is outside the caption (length 26)"),
    (_grounding(anns=[{"id": 3, "image_id": 7, "bbox": [90, 10, 15, 5], "tokens_positive": [[2, 5]]}]),
     "annotations[0] (id 3): box [90, 10, 15, 5] lies outside the 100x80 image"),
    (_grounding(anns=[{"id": 3, "image_id": 7, "bbox": [9, 10, 0, 5], "tokens_positive": [[2, 5]]}]),
     "annotations[0] (id 3): box [9, 10, 0, 5] has non-positive width or height"),
    (_grounding(anns=[{"id": 3, "image_id": 8, "bbox": [9, 10, 1, 5], "tokens_positive": [[2, 5]]}]),
     "annotations[0] (id 3): image_id 8 is not in 'images'"),
    (_grounding(anns=[{"id": 3, "image_id": 7, "tokens_positive": [[2, 5]]}]),
     "annotations[0] (id 3): 'bbox' must be 4 finite numbers"),
    (_grounding(task="vqa"), "'task' must be 'caption' or 'refexp'"),
])
def test_grounding_rejects_malformed(tmp_path, payload, message):
    path = _write(tmp_path, payload)
    with pytest.raises(DataFormatError) as e:
        load_grounding(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_file_named(tmp_path):
    with pytest.raises(DataFormatError, match="nope.json: no such file"):
        load_grounding(tmp_path / "nope.json")


def test_detection_rejects_malformed(tmp_path):
    base = {"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
            "categories": [{"id": 1, "name": "star"}]}
    cases = [({"annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5]}]},
              "annotations[0] (id 1): category_id 2 is not in 'categories'"),
             ({"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},
                               {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]},
              "annotations[1] (id 1): duplicate annotation id 1"),
             ({"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [-3, 0, 5, 5]}]},
              "lies outside the 50x40 image"),
             ({"annotations": [], "categories": []}, "'categories' is empty")]
    for extra, message in cases:
        path = _write(tmp_path, {**base, **extra}, "det.json")
        with pytest.raises(DataFormatError) as e:
            load_detection(path)
        assert str(path) in str(e.value) and message in str(e.value)


def test_pairs_rejects_malformed(tmp_path):
    for text, message in [("", "empty file"),
                          ('{"image": "a.png", "caption": "x"}\n{oops\n', "line 2: malformed JSON"),
                          ('{"image": "a.png"}\n', "line 1: missing 'caption'"),
                          ('{"image": "a.png", "caption": " "}\n', "line 1: empty caption")]:
        path = _write(tmp_path, text, "p.jsonl")
        with pytest.raises(DataFormatError) as e:
            load_pairs(path)
        assert str(path) in str(e.value) and message in str(e.value)


# ----------------------------------------------------------------------------------- prompts


def test_build_detection_prompt():
    prompt, spans = build_detection_prompt(["person", "red mug", "dog"])
    assert prompt == "person. red mug. dog"
    assert spans == [(0, 6), (8, 15), (17, 20)]
    assert parse_prompt(prompt) == spans
    for bad in ([], [""], ["a.b"], ["ok", "  "]):
        with pytest.raises(ValueError):
            build_detection_prompt(bad)


def test_parse_prompt():
    p = " person. red mug..  the dog on the left ."
    spans = parse_prompt(p)
    assert [p[s:e] for s, e in spans] == ["person", "red mug", "the dog on the left"]
    assert spans[0] == (1, 7)
    assert parse_prompt("cat") == [(0, 3)]
    with pytest.raises(ValueError, match="no phrases"):
        parse_prompt("   ")
    with pytest.raises(ValueError, match="no phrases"):
        parse_prompt(" . .. ")


def _negatives(sp, positives):
    return [n for n in sp.names if n not in positives]


def test_sample_detection_prompt_control_options():
    rng = np.random.default_rng(0)
    pos = ["cat", "dog"]
    names = [f"class{i}" for i in range(10)]
    for _ in range(20):
        full = sample_detection_prompt(rng, pos, names, max_negatives=4, control_prob=(0, 0, 1, 0))
        assert set(pos) <= set(full.names) and len(_negatives(full, pos)) == 4
        assert all(full.prompt[s:e] == n for (s, e), n in zip(full.spans, full.names))
        none = sample_detection_prompt(rng, pos, names, control_prob=(0, 1, 0, 0))
        assert sorted(none.names) == pos
        one = sample_detection_prompt(rng, pos, names, control_prob=(1, 0, 0, 0))
        assert len(_negatives(one, pos)) == 1 and set(pos) <= set(one.names)
    counts = {len(_negatives(sample_detection_prompt(rng, pos, names, max_negatives=5,
                                                     control_prob=(0, 0, 0, 0)), pos))
              for _ in range(300)}
    assert counts == {1, 2, 3, 4, 5}  # the "random number of negatives" branch: 1..full
    orders = {sample_detection_prompt(rng, pos, names, control_prob=(0, 0, 1, 0)).names
              for _ in range(10)}
    assert len(orders) > 1  # shuffled
    with pytest.raises(ValueError, match="drop-positive 0"):
        sample_detection_prompt(rng, pos, names, control_prob=(0.05, 0.05, 0.5, 0.2))


def test_sample_detection_prompt_drawn_positives_are_not_negatives():
    rng = np.random.default_rng(1)
    sp = sample_detection_prompt(rng, ["a", "b"], ["a", "b", "c"], max_negatives=3,
                                 control_prob=(0, 0, 1, 0))
    assert sorted(sp.names) == ["a", "b", "c"]  # no duplicates


def test_sample_detection_prompt_length_budget():
    rng = np.random.default_rng(2)
    names = [f"n{i:02d}" for i in range(30)]  # "nXX. " = 5 chars each
    for _ in range(10):
        sp = sample_detection_prompt(rng, ["p1", "p2"], names, max_negatives=30,
                                     control_prob=(0, 0, 1, 0), max_length=24)
        assert set(sp.names) >= {"p1", "p2"}
        assert len(sp.prompt) + 2 <= 24 and len(sp.names) == 2 + 3  # 2*4 + 3*5 = 23 < 24
    sp = sample_detection_prompt(rng, ["p1", "p2"], names, control_prob=(0, 1, 0, 0), max_length=4)
    assert len(sp.names) == 1  # a positive that overflows is dropped; caller drops its boxes
    a = sample_detection_prompt(np.random.default_rng(5), ["p1"], names)
    b = sample_detection_prompt(np.random.default_rng(5), ["p1"], names)
    assert a == b
