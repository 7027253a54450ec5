"""The synthetic grounding generator: determinism, language-to-box consistency, data properties."""
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiber.data import synth
from fiber.data.synth import COLOURS, KINDS, SynthConfig, generate

SIZES = ((192, 160), (160, 192), (224, 224))
N = 20


def _cfg(seed=0, **kw):
    return SynthConfig(images=N, seed=seed, sizes=SIZES, **kw)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "d"
    generate(_cfg(seed=7), root)
    g = json.loads((root / "grounding.json").read_text())
    d = json.loads((root / "detection.json").read_text())
    return root, g, d


def _objects(d):
    """image file_name -> [(xyxy, kind, attributes)] from detection.json."""
    kinds = {c["id"]: c["name"] for c in d["categories"]}
    names = {im["id"]: im["file_name"] for im in d["images"]}
    out = defaultdict(list)
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        out[names[a["image_id"]]].append(((x, y, x + w, y + h), kinds[a["category_id"]], a["attributes"]))
    return out


def _entry_boxes(g):
    """entry id -> phrase index -> [xyxy]."""
    out = defaultdict(lambda: defaultdict(list))
    for a in g["annotations"]:
        x, y, w, h = a["bbox"]
        out[a["image_id"]][a["phrase_ids"]].append((x, y, x + w, y + h))
    return out


def _find(objs, box):
    hits = [o for o in objs if np.allclose(o[0], box)]
    assert len(hits) >= 1, f"grounding box {box} is not an object of the image"
    return hits[0]


def test_same_seed_same_bytes_different_seed_different(tmp_path, data):
    root, _, _ = data
    generate(_cfg(seed=7), tmp_path / "again")
    assert _hashes(tmp_path / "again") == _hashes(root)
    generate(_cfg(seed=8), tmp_path / "other")
    other = _hashes(tmp_path / "other")
    assert other.keys() == _hashes(root).keys()
    differing = [k for k, v in other.items() if v != _hashes(root)[k]]
    assert "grounding.json" in differing and len(differing) > N // 2


def test_files_and_images(data):
    root, g, d = data
    assert [c["name"] for c in d["categories"]] == list(KINDS)
    assert [c["id"] for c in d["categories"]] == list(range(1, len(KINDS) + 1))
    assert len(d["images"]) == N
    for im in d["images"]:
        with Image.open(root / im["file_name"]) as pil:
            assert pil.mode == "RGB" and pil.size == (im["width"], im["height"])
            assert pil.size in SIZES
    pairs = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    captions = {(e["file_name"], e["caption"]) for e in g["images"] if e["task"] == "caption"}
    assert len(pairs) == N and {(p["image"], p["caption"]) for p in pairs} == captions


def test_every_box_inside_its_image_and_large_enough(data):
    _, g, d = data
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in d["images"]}
    entries = {e["id"]: e for e in g["images"]}
    boxes = [(a["bbox"], sizes[im["file_name"]]) for a in d["annotations"]
             for im in d["images"] if im["id"] == a["image_id"]]
    boxes += [(a["bbox"], (entries[a["image_id"]]["width"], entries[a["image_id"]]["height"]))
              for a in g["annotations"]]
    assert len(boxes) > 2 * N
    for (x, y, w, h), (W, H) in boxes:
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H
        assert min(w, h) >= 12


def test_every_span_points_at_its_phrase(data):
    """Each phrase's text names the colour and kind of every box it has (checked against the
    detection file's per-object attributes); an absent phrase names a (colour, kind) the image lacks."""
    _, g, d = data
    objects, boxes = _objects(d), _entry_boxes(g)
    for e in g["images"]:
        objs = objects[e["file_name"]]
        for p, spans in enumerate(e["tokens_positive_eval"]):
            text = " ".join(e["caption"][s:t] for s, t in spans)
            words = text.split()
            found = boxes[e["id"]].get(p, [])
            for box in found:
                _, kind, attrs = _find(objs, box)
                assert attrs["colour"] in words, (text, attrs)
                assert kind in words or kind + "s" in words or kind + "es" in words, (text, kind)
            if not found:
                colour, kind = words
                assert colour in COLOURS and kind in KINDS
                assert not [o for o in objs if o[1] == kind and o[2]["colour"] == colour]
            elif len(found) > 1:
                assert words[0] in synth.NUMBERS[2:] and synth.NUMBERS.index(words[0]) == len(found)
    for a in g["annotations"]:  # annotation spans are their phrase's spans
        e = next(x for x in g["images"] if x["id"] == a["image_id"])
        assert a["tokens_positive"] == e["tokens_positive_eval"][a["phrase_ids"]]


def test_phrase_kinds_exist(data):
    _, g, _ = data
    boxes = _entry_boxes(g)
    counts = [len(boxes[e["id"]].get(p, [])) for e in g["images"]
              for p in range(len(e["tokens_positive_eval"]))]
    assert counts.count(0) >= 2, "phrases without a box"
    assert sum(c >= 2 for c in counts) >= 2, "phrases with several boxes"
    tasks = {(e["task"], e["has_relation"]) for e in g["images"]}
    assert tasks == {("caption", False), ("refexp", False), ("refexp", True)}


REL = re.compile(r"^(?: that is)? (?:to the )?(left of|right of|above|below|under) the (.+)$")
SUPER = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "lowest": (1, -1)}


def _centre(box):
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _described(objs, words):
    """Objects fitting '[size] [texture] colour kind'."""
    *extra, colour, kind = words

    def fits(o):
        attrs = o[2]
        for w in extra:
            key = "size" if w in ("small", "medium", "large") else "texture"
            if attrs[key] != {"plain": "solid"}.get(w, w):
                return False
        return o[1] == kind and attrs["colour"] == colour

    return [o for o in objs if fits(o)]


def test_relations_pick_exactly_the_target(data):
    """Re-derive every relational expression from the detection file: the anchor text fits one
    object, the target's colour+kind fits several, and the spatial words single out the target."""
    _, g, d = data
    objects, boxes = _objects(d), _entry_boxes(g)
    relation_only = 0
    rel_entries = [e for e in g["images"] if e["has_relation"]]
    assert len(rel_entries) >= 5
    for e in rel_entries:
        objs = objects[e["file_name"]]
        (s, t), = e["tokens_positive_eval"][0]
        target = _find(objs, boxes[e["id"]][0][0])
        words = e["caption"][s:t].split()[1:]  # drop "the"
        if words[0] in SUPER:
            axis, sign = SUPER[words[0]]
            same = _described(objs, words[1:])
            assert len(same) >= 2 and target in same
            best = min(same, key=lambda o: sign * _centre(o[0])[axis])
            assert best is target
        else:
            same = _described(objs, words)
            m = REL.match(e["caption"][t:])
            assert m, e["caption"]
            anchors = _described(objs, m.group(2).split())
            assert len(anchors) == 1, e["caption"]
            axis, sign = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1),
                          "below": (1, -1), "under": (1, -1)}[m.group(1)]
            a = sign * _centre(anchors[0][0])[axis]
            assert sign * _centre(target[0])[axis] < a
            assert all(sign * _centre(o[0])[axis] >= a for o in same if o is not target)
        assert len(same) >= 2, "a relation is only generated when colour+kind is ambiguous"
        relation_only += any(o[2] == target[2] for o in same if o is not target)
    assert relation_only >= 1, "a target identical to a distractor except for its position"


def test_existing_output_is_kept(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate(SynthConfig(images=1, sizes=SIZES), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli(tmp_path, capsys):
    parser = synth.get_args_parser()
    args = parser.parse_args(["--out", str(tmp_path / "c"), "--images", "2", "--size", "200x160",
                              "--no-progress"])
    assert synth.main(args) == 0
    assert "images/s" in capsys.readouterr().out
    assert synth.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    bad = parser.parse_args(["--out", str(tmp_path / "e"), "--images", "0", "--no-progress"])
    assert synth.main(bad) == 2
    assert "images must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--out", "x", "--size", "wide"])
    assert e.value.code == 2
    assert not (tmp_path / "e").exists()
