"""Training prompts that make the colour token decide (colour-kind detection prompts with
absent hard negatives, hard negatives appended to captions), the attribute benchmark's matching,
and compress.recover (a checkpoint read back from an FP32 package's ONNX graphs)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fiber.config import get_config
from fiber.data.synth import COLOURS, KINDS, SynthConfig, generate
from train import fine
from train.data import (CONFUSABLE_KINDS, AttributeOptions, Stage2Options, decoy_kind_pairs, free_negative_pairs,
                        hard_negative_pairs, load_stage2, raw_tokenizer)

CFG = get_config("fiber-tiny-test")
S = CFG.swin.img_size
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(SynthConfig(images=8, seed=0, sizes=((160, 128), (128, 160))), out)
    return out


def _scene_pairs(data_dir):
    det = json.loads((data_dir / "detection.json").read_text())
    kinds = {c["id"]: c["name"] for c in det["categories"]}
    pairs: dict[int, list] = {}
    for a in det["annotations"]:
        pairs.setdefault(a["image_id"], []).append((a["attributes"]["colour"], kinds[a["category_id"]]))
    return det, pairs


def _train_tiny(data_dir, out, steps: int, *flags: str) -> list[dict]:
    """train.fine on the tiny config for ``steps`` steps with ``flags``; its metrics.jsonl records."""
    args = fine.get_args_parser().parse_args(
        ["--data", str(data_dir), "--out", str(out), "--config", "fiber-tiny-test", "--init", "none",
         "--max-steps", str(steps), "--batch-size", "4", "--log-every", "1", "--no-progress", *flags])
    assert fine.main(args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _attribute_items(data_dir, **options) -> list[tuple]:
    """(item, the image's (colour, kind) pairs) for every detection image of ``data_dir`` drawn with
    attribute prompts always on and ``options``, three times (numpy seeds 0, 1, 2)."""
    det, pairs = _scene_pairs(data_dir)
    opts = AttributeOptions(attribute_prompts=1.0, **options)
    data = load_stage2(data_dir, CFG, Stage2Options(grounding=False, attributes=opts))
    out = []
    for seed in range(3):
        np.random.seed(seed)
        out += [(data[i], pairs.get(im["id"], [])) for i, im in enumerate(det["images"])]
    return out


def _marked(item, row):
    """The lower-cased words whose tokens a positive-map row marks."""
    tok = raw_tokenizer()
    enc = tok.encode(item.prompt.lower())
    assert enc.ids == item.input_ids.tolist()
    return "".join(item.prompt.lower()[s:e] for t, (s, e) in enumerate(enc.offsets) if row[t] > 0)


def test_hard_negative_pairs_are_absent_and_share_a_kind_or_colour():
    rng = np.random.default_rng(0)
    present = [("red", "star"), ("blue", "ring")]
    for _ in range(50):
        negs = hard_negative_pairs(rng, present, tuple(COLOURS), KINDS, 4)
        assert len(negs) == len(set(negs)) == 4
        for c, k in negs:
            assert (c, k) not in present
            assert any(c == pc or k == pk for pc, pk in present)
        # both kinds of hard negative: same kind other colour and same colour other kind
        assert any(k in ("star", "ring") and c not in ("red", "blue") or
                   (c, k) in {("blue", "star"), ("red", "ring")} for c, k in negs)
        assert any(c in ("red", "blue") and k not in ("star", "ring") for c, k in negs)
    assert hard_negative_pairs(rng, [("red", "star")], ("red",), ("star",), 3) == []


def test_attribute_options_are_checked(data_dir):
    for bad in (AttributeOptions(attribute_prompts=1.5), AttributeOptions(hard_negatives=-0.1),
                AttributeOptions(hard_negatives=0.5, max_hard_negatives=0)):
        with pytest.raises(ValueError):
            load_stage2(data_dir, CFG, Stage2Options(attributes=bad))
    with pytest.raises(ValueError, match="detection"):
        load_stage2(data_dir, CFG, Stage2Options(detection=False,
                                                 attributes=AttributeOptions(hard_negatives=0.5)))


def test_colour_kind_prompts_mark_each_object_with_its_own_pair_only(data_dir):
    data = load_stage2(data_dir, CFG, Stage2Options(grounding=False,
                                                    attributes=AttributeOptions(attribute_prompts=1.0)))
    det, pairs = _scene_pairs(data_dir)
    seen_negative = 0
    for seed in range(3):
        np.random.seed(seed)
        for i, im in enumerate(det["images"]):
            item = data[i]
            names = item.prompt.split(". ")
            present = {f"{c} {k}" for c, k in pairs.get(im["id"], [])}
            assert all(len(n.split()) == 2 for n in names), item.prompt
            negs = [n for n in names if n not in present]
            seen_negative += len(negs)
            for n in negs:  # absent, and sharing the colour or the kind of a present pair
                c, k = n.split()
                assert any(c == p.split()[0] or k == p.split()[1] for p in present), (n, present)
            scale = S / max(im["width"], im["height"])
            anns = [a for a in det["annotations"] if a["image_id"] == im["id"]]
            kinds = {c["id"]: c["name"] for c in det["categories"]}
            for a in anns:
                x, y, w, h = a["bbox"]
                box = np.array([x, y, x + w, y + h], np.float32) * scale
                hits = np.abs(item.boxes - box).max(1) < 1e-2
                pair = f"{a['attributes']['colour']} {kinds[a['category_id']]}"
                if pair not in names:  # cut for the tiny config's 32-token budget
                    assert not hits.any()
                    continue
                assert hits.sum() == 1
                assert _marked(item, item.positive_map[hits][0]) == pair.replace(" ", "")
    assert seen_negative > 0


def test_captions_get_absent_hard_negatives_whose_tokens_are_all_negative(data_dir):
    opts = Stage2Options(attributes=AttributeOptions(hard_negatives=1.0, max_hard_negatives=3))
    data = load_stage2(data_dir, CFG, opts)
    plain = load_stage2(data_dir, CFG, Stage2Options(detection=True))
    np.random.seed(0)
    changed = 0
    for i in range(len(data.grounding)):
        item, base = data[i], plain[i]
        assert item.prompt.startswith(base.prompt)
        extra = item.prompt[len(base.prompt):]
        present = {f"{c} {k}" for c, k in data.scene_pairs[data.grounding[i].image]}
        if extra:
            changed += 1
            added = extra[2:].split(". ")
            assert extra.startswith(". ") and 1 <= len(added) <= 3
            assert not set(added) & present
            assert len(item.input_ids) <= CFG.max_text_len
        # the caption's own targets are unchanged; the appended tokens are negative everywhere
        np.testing.assert_array_equal(item.boxes, base.boxes)
        np.testing.assert_array_equal(item.positive_map[:, :len(base.input_ids) - 1],
                                      base.positive_map[:, :len(base.input_ids) - 1])
        assert not item.positive_map[:, len(base.input_ids) - 1:].any()
    assert changed > 0


def test_word_targets_mark_the_appended_words_that_hold_for_a_caption_box(data_dir):
    """word_targets on captions: the same caption and appended absent phrases as without; each
    caption box keeps its phrase's tokens and is also positive for the appended colour and kind
    words of its own object (its detection annotation), and for no other appended word."""
    det, pairs = _scene_pairs(data_dir)
    opts = lambda words: Stage2Options(attributes=AttributeOptions(  # noqa: E731
        hard_negatives=1.0, max_hard_negatives=3, word_targets=words))
    words, phrases = load_stage2(data_dir, CFG, opts(True)), load_stage2(data_dir, CFG, opts(False))
    kinds = {c["id"]: c["name"] for c in det["categories"]}
    marked = 0
    for i in range(len(words.grounding)):
        np.random.seed(i)
        item = words[i]
        np.random.seed(i)
        base = phrases[i]
        assert item.prompt == base.prompt
        np.testing.assert_array_equal(item.boxes, base.boxes)
        caption = words.grounding[i].caption
        if item.prompt == caption:
            np.testing.assert_array_equal(item.positive_map, base.positive_map)
            continue
        appended = item.prompt[len(caption) + 2:]
        image = next(im for im in det["images"] if words.grounding[i].image.name == im["file_name"].split("/")[-1])
        scale = S / max(image["width"], image["height"])
        for g, box in enumerate(item.boxes):
            assert ((item.positive_map[g] > 0) >= (base.positive_map[g] > 0)).all()   # the phrase kept
            extra = (item.positive_map[g] > 0) & ~(base.positive_map[g] > 0)
            got = _marked_words(item, extra)
            ann = next(a for a in det["annotations"] if a["image_id"] == image["id"] and np.abs(
                np.array([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
                         np.float32) * scale - box).max() < 1e-2)
            own = (ann["attributes"]["colour"], kinds[ann["category_id"]])
            want = [w for n in appended.split(". ") for w in n.split() if w in own]
            assert sorted(got) == sorted(want), (item.prompt, own)
            marked += len(want)
    assert marked > 0


def test_fine_cli_trains_with_attribute_prompts(data_dir, tmp_path):
    args = fine.get_args_parser().parse_args(
        ["--data", str(data_dir), "--out", str(tmp_path / "run"), "--config", "fiber-tiny-test",
         "--init", "none", "--max-steps", "2", "--batch-size", "4", "--log-every", "1",
         "--no-progress", "--attribute-prompts", "0.8", "--hard-negatives", "0.5"])
    assert fine.main(args) == 0
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == 2 and np.isfinite(rec[-1]["loss"])


# ----------------------------------------------------------------------------- benchmark


def test_attribute_matching_counts_wrong_colour_absent_phrase_and_duplicates():
    from benchmarks.attributes import PromptedScene, match

    scene = PromptedScene(np.zeros((64, 64, 3), np.uint8), "red star. blue star. red bolt",
                          (("red", "star"), ("blue", "star"), ("red", "bolt")),
                          np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
                          (("red", "star"), ("blue", "star")), (2,))
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]],
                     np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1], np.float32)
    phrase = np.array([0, 1, 2, 1, 0])
    c = match(scene, boxes, scores, phrase, 0.5)
    assert (c["tp"], c["fp"], c["matched"], c["objects"]) == (2, 2, 2, 2)
    assert (c["fp_wrong_pair"], c["fp_absent_phrase"], c["fp_duplicate_or_loc"]) == (1, 1, 0)
    c = match(scene, boxes, scores, phrase, 0.0)   # the low duplicate counts too
    assert c["fp_duplicate_or_loc"] == 1 and c["tp"] == 2
    c = match(scene, boxes, scores, phrase, 0.95)
    assert c["tp"] == c["fp"] == c["matched"] == 0


def test_attribute_scenes_name_present_pairs_and_two_absent_hard_negatives():
    from benchmarks.attributes import make_scenes

    scenes = make_scenes(6, seed=3)
    assert [s.prompt for s in scenes] == [s.prompt for s in make_scenes(6, seed=3)]
    for s in scenes:
        assert set(s.pairs) <= set(s.phrases) and len(s.absent) == 2
        for j in s.absent:
            c, k = s.phrases[j]
            assert (c, k) not in s.pairs
        kinds = {k for _, k in s.pairs}
        colours = {c for c, _ in s.pairs}
        assert any(s.phrases[j][1] in kinds and s.phrases[j][0] not in colours or
                   s.phrases[j][1] in kinds for j in s.absent)
        assert any(s.phrases[j][0] in colours for j in s.absent)


def test_absent_only_scenes_name_only_look_alikes_and_every_detection_is_a_false_positive():
    from benchmarks.attributes import PromptedScene, _summary, make_scenes, match

    default = make_scenes(6, seed=3)
    assert [s.prompt for s in default] == [s.prompt for s in make_scenes(6, seed=3, absent_only=False)]
    for s in make_scenes(6, seed=3, absent_only=True):
        assert s.absent == tuple(range(len(s.phrases))) and 2 <= len(s.phrases) <= 4
        assert not set(s.phrases) & set(s.pairs)
        assert any(c in {c for c, _ in s.pairs} for c, _ in s.phrases)   # a present colour ...
        assert any(k in {k for _, k in s.pairs} for _, k in s.phrases)   # ... and a present kind
    # a red arrow prompted "red star. blue arrow": both firing on it are false positives, one of
    # its colour and one of its kind; the second image has none
    scene = PromptedScene(np.zeros((64, 64, 3), np.uint8), "red star. blue arrow",
                          (("red", "star"), ("blue", "arrow")), np.array([[0, 0, 10, 10]], np.float32),
                          (("red", "arrow"),), (0, 1))
    hit = match(scene, np.array([[0, 0, 10, 10], [1, 0, 10, 10]], np.float32),
                np.array([0.6, 0.4], np.float32), np.array([0, 1]), 0.3)
    assert (hit["fp"], hit["fp_absent_same_colour"], hit["fp_absent_same_kind"], hit["images_with_fp"]) == (2, 1, 1, 1)
    miss = match(scene, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, int), 0.3)
    total = _summary([hit, miss])
    assert (total["fp_per_image"], total["share_images_with_fp"], total["precision"]) == (1.0, 0.5, 0.0)


# ----------------------------------------------------------------------------- recover


@pytest.mark.slow  # an export and a recovery of the tiny model: ~15 s on this CPU
def test_recover_reads_the_weights_back_from_an_fp32_package(tmp_path):
    """Export a random tiny checkpoint (gates opened), recover it from the package: every tensor
    a graph reads comes back exactly (word table: its per-row int8 values); an INT8-labelled
    package, a missing folder and an existing --out are refused with exit 2. The CLIs run in-process
    (test_export.run_cli); the last refusal runs compress.recover as a program (its smoke test)."""
    from safetensors.torch import load_file
    from test_export import run_cli as run
    from test_export import run_program

    from fiber.checkpoint import save_checkpoint
    from fiber.models import FiberForGrounding

    torch.manual_seed(3)
    model = FiberForGrounding(CFG)
    model.backbone.set_gates(0.5)
    ckpt = save_checkpoint(tmp_path / "ckpt", model.state_dict(), CFG, {"task": "fine"})
    package = tmp_path / "pkg"
    r = run("compress.export", "--checkpoint", str(ckpt), "--out", str(package), "--buckets", "16",
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "back"
    r = run("compress.recover", "--package", str(package), "--out", str(out))
    assert r.returncode == 0, r.stderr
    got, want = load_file(str(out / "model.safetensors")), model.state_dict()
    words = "backbone.text.embeddings.word_embeddings.weight"
    unread = {k for k in want if k.endswith("crossattention_t2i.output.LayerNorm.weight")
              or k.endswith("crossattention_t2i.output.LayerNorm.bias")}
    for k, v in want.items():
        if k == words:  # per-row int8: within half a step of each row's scale
            step = v.abs().amax(1, keepdim=True) / 127
            assert ((got[k] - v).abs() <= step / 2 + 1e-6).all()
        elif k == "backbone.text.embeddings.token_type_embeddings.weight":
            torch.testing.assert_close(got[k][0], v[0], rtol=0, atol=0)  # row 1 is never read
        elif k not in unread:
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    meta = json.loads((out / "config.json").read_text())
    assert meta["recovered_from"] == str(package) and max(meta["recovery"]["parity"].values()) < 1e-4
    r = run("compress.recover", "--package", str(package), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_program("compress.recover", "--package", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_colour_prompts_and_caption_swaps(data_dir):
    """Colour-only prompts name every colour and mark each box with its own colour; a swapped
    caption sample becomes an attribute sample of its own image."""
    opts = AttributeOptions(attribute_prompts=1.0, colour_prompts=1.0, caption_swap=1.0)
    data = load_stage2(data_dir, CFG, Stage2Options(attributes=opts))
    det, pairs = _scene_pairs(data_dir)
    np.random.seed(0)
    for i, im in enumerate(det["images"]):
        item = data[len(data.grounding) + i]
        assert sorted(item.prompt.split(". ")) == sorted(data.colours)
        colours = [c for c, _ in pairs.get(im["id"], [])]
        assert len(item.boxes) == len({tuple(a["bbox"]) for a in det["annotations"] if a["image_id"] == im["id"]})
        marked = sorted(_marked(item, row) for row in item.positive_map)
        assert set(marked) <= set(colours) and marked
    for i, s in enumerate(data.grounding):
        item = data[i]
        assert sorted(item.prompt.split(". ")) == sorted(data.colours)  # swapped for its image's
        assert data.cache.paths[item.image] == s.image


def test_kind_prompts_name_every_kind_and_mark_each_box_with_its_own(data_dir):
    """--kind-prompts: an attribute item prompted with every kind name, each box positive for the
    tokens of its own kind only; 0 leaves the attribute items as they were."""
    opts = AttributeOptions(attribute_prompts=1.0, kind_prompts=1.0)
    data = load_stage2(data_dir, CFG, Stage2Options(attributes=opts))
    det, pairs = _scene_pairs(data_dir)
    np.random.seed(0)
    seen = 0
    for i, im in enumerate(det["images"]):
        item = data[len(data.grounding) + i]
        assert sorted(item.prompt.split(". ")) == sorted(data.kinds)
        kinds = [k for _, k in pairs.get(im["id"], [])]
        marked = [_marked(item, row) for row in item.positive_map]
        assert len(marked) == len(kinds) and sorted(marked) == sorted(kinds)
        seen += len(marked)
    assert seen
    plain = load_stage2(data_dir, CFG, Stage2Options(attributes=AttributeOptions(attribute_prompts=1.0)))
    np.random.seed(0)
    item = plain[len(plain.grounding)]
    assert sorted(item.prompt.split(". ")) != sorted(plain.kinds)


def test_colour_and_kind_aux_losses_are_logged_and_left_out_of_the_final_weights(data_dir, tmp_path):
    """--colour-aux / --kind-aux: batches carry each box's colour and kind index (those of its
    detection annotation), the loss has 'loss_colour' / 'loss_kind' parts (ln 8 ~ 2.08 and
    ln 12 ~ 2.48 at the start), checkpoints keep the classifiers for resume and RUN/final drops
    them; without attribute data each is refused."""
    from safetensors.numpy import load_file

    data = load_stage2(data_dir, CFG, Stage2Options(attributes=AttributeOptions(attribute_prompts=1.0)))
    det, pairs = _scene_pairs(data_dir)
    np.random.seed(0)
    items = [data[len(data.grounding) + i] for i in range(3)]
    batch = data.collate(items)
    for ids, kinds, boxes, item in zip(batch["colour_ids"], batch["kind_ids"], batch["boxes"], items):
        assert len(ids) == len(boxes) == len(kinds)
        assert (ids >= 0).all() and (ids < len(data.colours)).all()
        assert (kinds >= 0).all() and (kinds < len(data.kinds)).all()
        present = {(data.colours[c], data.kinds[k]) for c, k in zip(ids.tolist(), kinds.tolist())}
        image_id = det["images"][items.index(item)]["id"]
        assert present <= set(pairs[image_id])                  # each box's own annotation
    out = tmp_path / "run"
    rec = _train_tiny(data_dir, out, 2, "--attribute-prompts", "0.8", "--caption-swap", "0.5",
                      "--colour-aux", "1.0", "--kind-aux", "0.5")
    assert 1.0 < rec[0]["loss_colour"] < 3.0 and 1.5 < rec[0]["loss_kind"] < 3.5
    final = load_file(str(out / "final" / "model.safetensors"))
    assert not [k for k in final if k.startswith(("colour_aux", "kind_aux"))]
    ckpt = load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
    assert [k for k in ckpt if k.startswith("colour_aux")] and [k for k in ckpt if k.startswith("kind_aux")]
    for flag in ("--colour-aux", "--kind-aux"):
        args = fine.get_args_parser().parse_args(
            ["--data", str(data_dir), "--out", str(tmp_path / "bad"), "--config", "fiber-tiny-test",
             "--init", "none", "--max-steps", "1", "--batch-size", "4", "--no-progress", flag, "1"])
        assert fine.main(args) == 2


def test_kind_separation_loss_costs_only_pairs_over_the_margin_and_parts_them():
    """kind_separation_loss: 0 when every pair of kind vectors is under the margin (a shared
    direction is free); > 0 for two kinds folded together, and a gradient step parts them; a kind
    of several word pieces is the mean of its tokens."""
    from train.tasks import KIND_SEPARATION_MARGIN, kind_separation_loss

    torch.manual_seed(0)
    common = torch.nn.functional.normalize(torch.randn(8), dim=0)
    apart = torch.stack([0.8 * common + 0.6 * torch.eye(8)[i] for i in range(3)])   # a shared direction
    words = torch.eye(3)
    cos = torch.nn.functional.normalize(apart, dim=-1) @ torch.nn.functional.normalize(apart, dim=-1).T
    assert cos[0, 1] < KIND_SEPARATION_MARGIN and kind_separation_loss(apart, words) == 0
    folded = apart.clone()
    folded[1] = folded[0] + 0.05 * torch.randn(8)
    tokens = torch.cat([folded, folded[1:2] * 1.02]).requires_grad_(True)   # kind 1: two pieces
    pieces = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.float32)
    loss = kind_separation_loss(tokens, pieces)
    assert loss > 0
    loss.backward()
    with torch.no_grad():
        stepped = tokens - 5.0 * tokens.grad
        v = torch.nn.functional.normalize(pieces @ stepped, dim=-1)
        before = torch.nn.functional.normalize(pieces @ tokens, dim=-1)
    assert float(v[0] @ v[1]) < float(before[0] @ before[1])
    assert kind_separation_loss(stepped, pieces) < loss


def test_kind_separation_is_logged_recorded_and_needs_the_attribute_data(data_dir, tmp_path):
    out = tmp_path / "run"
    rec = _train_tiny(data_dir, out, 2, "--attribute-prompts", "0.8", "--kind-separation", "10")
    assert all(np.isfinite(r["loss_kind_separation"]) and r["loss_kind_separation"] >= 0 for r in rec)
    stage = json.loads((out / "final" / "config.json").read_text())["stage"]
    assert stage["kind_separation"] == 10
    args = fine.get_args_parser().parse_args(
        ["--data", str(data_dir), "--out", str(tmp_path / "bad"), "--config", "fiber-tiny-test",
         "--init", "none", "--max-steps", "1", "--batch-size", "4", "--no-progress", "--kind-separation", "1"])
    assert fine.main(args) == 2


def test_omit_present_leaves_pairs_out_and_their_boxes_unmarked(data_dir):
    """--omit-present 1: an attribute item's prompt holds only absent hard negatives (each sharing
    a colour or kind with a present pair) and no box is a positive; 0 keeps every present pair."""
    det, pairs = _scene_pairs(data_dir)
    omit = load_stage2(data_dir, CFG, Stage2Options(grounding=False, attributes=AttributeOptions(
        attribute_prompts=1.0, omit_present=1.0)))
    keep = load_stage2(data_dir, CFG, Stage2Options(grounding=False, attributes=AttributeOptions(
        attribute_prompts=1.0)))
    checked = 0
    for i, im in enumerate(det["images"]):
        present = {f"{c} {k}" for c, k in pairs.get(im["id"], [])}
        if not present:
            continue
        np.random.seed(i)
        item = omit[i]
        names = set(item.prompt.split(". "))
        assert not names & present and len(item.boxes) == 0, item.prompt
        np.random.seed(i)
        assert len(keep[i].boxes) > 0
        checked += 1
    assert checked > 0
    with pytest.raises(ValueError, match="omit-present"):
        load_stage2(data_dir, CFG, Stage2Options(attributes=AttributeOptions(attribute_prompts=1.0,
                                                                             omit_present=2.0)))


def test_absent_only_items_name_look_alikes_alone(data_dir):
    """absent_only (train.fine --absent-only): at 1 every attribute item's prompt is absent
    look-alikes only (each sharing a colour or a kind with a present pair) and no box is a
    positive; at 0.5 some items are so and the others name their present pairs; with
    keep_omitted the objects stay as unnamed boxes; a value outside [0, 1] is refused."""
    det, pairs = _scene_pairs(data_dir)
    opts = lambda p, kept=False: Stage2Options(grounding=False, attributes=AttributeOptions(  # noqa: E731
        attribute_prompts=1.0, absent_only=p, keep_omitted=kept))
    every, half, kept = (load_stage2(data_dir, CFG, opts(1.0)), load_stage2(data_dir, CFG, opts(0.5)),
                         load_stage2(data_dir, CFG, opts(1.0, True)))
    seen = {"absent": 0, "named": 0}
    for i, im in enumerate(det["images"]):
        scene = pairs.get(im["id"], [])
        if not scene:
            continue
        present, colours, kinds = {f"{c} {k}" for c, k in scene}, {c for c, _ in scene}, {k for _, k in scene}
        np.random.seed(i)
        item = every[i]
        names = set(item.prompt.split(". "))
        assert names and not names & present and len(item.boxes) == 0, item.prompt
        assert all(n.split(" ", 1)[0] in colours or n.split(" ", 1)[1] in kinds for n in names), item.prompt
        np.random.seed(i)
        assert len(kept[i].boxes) > 0 and not kept[i].positive_map.any()
        np.random.seed(i)
        seen["absent" if len(half[i].boxes) == 0 else "named"] += 1
    assert seen["absent"] > 0 and seen["named"] > 0, seen
    with pytest.raises(ValueError, match="absent-only"):
        load_stage2(data_dir, CFG, opts(1.5))


def test_token_contrast_loss_puts_each_positive_anchor_on_its_phrase():
    """MDETR soft-token loss: log(k) at uniform logits over k real tokens; lower when the anchor's
    phrase tokens lead; padding ignored; negatives anchors add nothing; 0 without positives."""
    from train.tasks import token_contrast_loss

    logits = torch.zeros(1, 3, 5, requires_grad=True)
    targets = torch.zeros(1, 3, 5)
    targets[0, 0, 1:3] = 1
    matched = torch.tensor([[0, -1, -1]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss = token_contrast_loss(logits, targets, matched, mask)
    assert loss.item() == pytest.approx(np.log(4))
    loss.backward()
    g = logits.grad[0]
    assert (g[0, 1:3] < 0).all() and (g[0, [0, 3]] > 0).all() and g[0, 4] == 0 and (g[1:] == 0).all()
    better = torch.zeros(1, 3, 5)
    better[0, 0, 1:3] = 3.0
    assert token_contrast_loss(better, targets, matched, mask) < loss
    assert token_contrast_loss(logits, targets, torch.full((1, 3), -1), mask).item() == 0.0


def test_kept_omitted_boxes_are_unnamed_objects_with_all_zero_rows(data_dir):
    """keep_omitted (train.fine --no-match-logit): with every present pair omitted, each object
    stays a box with an all-zero positive-map row; with none omitted the targets are as without
    it; it needs omit-present > 0 (or absent-only > 0)."""
    det, pairs = _scene_pairs(data_dir)
    opts = lambda omit, kept: Stage2Options(grounding=False, attributes=AttributeOptions(  # noqa: E731
        attribute_prompts=1.0, omit_present=omit, keep_omitted=kept))
    kept, plain = load_stage2(data_dir, CFG, opts(1.0, True)), load_stage2(data_dir, CFG, opts(1.0, False))
    checked = 0
    for i, im in enumerate(det["images"]):
        if not pairs.get(im["id"]):
            continue
        np.random.seed(i)
        item = kept[i]
        np.random.seed(i)
        assert item.prompt == plain[i].prompt and len(plain[i].boxes) == 0
        assert len(item.boxes) > 0 and not item.positive_map.any()
        assert len(item.boxes) == len({tuple(np.round(b, 3)) for b in item.boxes})   # merged, as named boxes are
        checked += 1
    assert checked > 0
    with pytest.raises(ValueError, match="omit-present > 0"):
        load_stage2(data_dir, CFG, opts(0.0, True))


def test_word_targets_mark_each_word_where_it_holds(data_dir):
    """word_targets (train.fine --word-targets): the same prompt as phrase targets, but each object
    is positive for the colour word of every phrase of its colour and the kind word of every phrase
    of its kind, and for nothing else; its own pair's phrase is wholly positive."""
    det, pairs = _scene_pairs(data_dir)
    opts = lambda words: Stage2Options(grounding=False, attributes=AttributeOptions(  # noqa: E731
        attribute_prompts=1.0, word_targets=words))
    words, phrases = load_stage2(data_dir, CFG, opts(True)), load_stage2(data_dir, CFG, opts(False))
    kinds = {c["id"]: c["name"] for c in det["categories"]}
    shared = 0
    for i, im in enumerate(det["images"]):
        np.random.seed(i)
        item = words[i]
        np.random.seed(i)
        assert item.prompt == phrases[i].prompt
        names = item.prompt.split(". ")
        scale = S / max(im["width"], im["height"])
        for a in (a for a in det["annotations"] if a["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            hits = np.abs(item.boxes - np.array([x, y, x + w, y + h], np.float32) * scale).max(1) < 1e-2
            colour, kind = a["attributes"]["colour"], kinds[a["category_id"]]
            want = [wd for n in names for wd in n.split() if wd in (colour, kind)]
            if not want:                       # no word of the prompt names it: background
                assert not hits.any()
                continue
            assert hits.sum() == 1
            row = item.positive_map[hits][0]
            assert sorted(_marked_words(item, row)) == sorted(want)
            shared += len(want) > 2 or f"{colour} {kind}" not in names
    assert shared > 0       # some object is named by a word of another phrase


def _marked_words(item, row):
    """The words (of the ". "-joined two-word names) that have a marked token."""
    tok = raw_tokenizer()
    enc = tok.encode(item.prompt.lower())
    words, pos = [], 0
    for name in item.prompt.split(". "):
        for wd in name.split():
            a = item.prompt.index(wd, pos)
            if any(row[t] > 0 for t, (s, e) in enumerate(enc.offsets) if a <= s < a + len(wd)):
                words.append(wd)
            pos = a + len(wd)
    return words


def test_no_match_slot_levels_the_soft_token_scores():
    """token_contrast_loss(no_match_logit=C): an anchor of an unnamed object (all-zero row) puts its
    mass on a constant slot C, so its token logits are pushed down (to -log of the slot's share);
    a named anchor's phrase must beat C too; without the slot, unnamed anchors are left out."""
    from train.tasks import token_contrast_loss

    mask = torch.tensor([[1, 1, 1, 0]])
    targets = torch.zeros(1, 2, 4)
    targets[0, 0, :2] = 1                        # anchor 0: phrase tokens 0-1; anchor 1: unnamed object
    matched = torch.tensor([[0, 1]])
    logits = torch.zeros(1, 2, 4, requires_grad=True)
    with_slot = token_contrast_loss(logits, targets, matched, mask, no_match_logit=-1.0)
    e = np.exp(-1.0)
    want = (-np.log(1 / (3 + e)) + -np.log(e / (3 + e))) / 2     # named: uniform on 2 of 3 + slot
    assert with_slot.item() == pytest.approx(want, rel=1e-5)
    with_slot.backward()
    assert (logits.grad[0, 1, :3] > 0).all() and logits.grad[0, 1, 3] == 0   # unnamed: every token down
    assert (logits.grad[0, 0, :2] < 0).all() and logits.grad[0, 0, 2] > 0
    low = torch.zeros(1, 2, 4)
    low[0, 1] = -5.0
    assert token_contrast_loss(low, targets, matched, mask, no_match_logit=-1.0) < with_slot
    named_only = token_contrast_loss(logits, targets, torch.tensor([[0, -1]]), mask)
    assert token_contrast_loss(logits, targets, matched, mask).item() == pytest.approx(named_only.item())
    assert token_contrast_loss(logits, torch.zeros(1, 2, 4), matched, mask).item() == 0.0


def test_no_match_slot_only_at_unnamed_anchors():
    """unnamed_only: the unnamed anchor's term is the slot's as before; the named anchor's is the
    plain softmax over the prompt's tokens (no slot to beat), so its gradient ignores C."""
    from train.tasks import token_contrast_loss

    mask = torch.tensor([[1, 1, 1, 0]])
    targets = torch.zeros(1, 2, 4)
    targets[0, 0, :2] = 1                        # anchor 0: phrase tokens 0-1; anchor 1: unnamed object
    matched = torch.tensor([[0, 1]])
    logits = torch.zeros(1, 2, 4)
    e = np.exp(-1.0)
    got = token_contrast_loss(logits, targets, matched, mask, no_match_logit=-1.0, unnamed_only=True)
    want = (-np.log(1 / 3) + -np.log(e / (3 + e))) / 2          # named: uniform on 2 of 3, no slot
    assert got.item() == pytest.approx(want, rel=1e-5)
    named = torch.tensor([[0, -1]])                              # the named anchor alone: as without a slot
    for c in (-3.0, 0.0, 2.0):
        assert token_contrast_loss(logits, targets, named, mask, no_match_logit=c, unnamed_only=True).item() \
            == pytest.approx(token_contrast_loss(logits, targets, named, mask).item())
    full = token_contrast_loss(logits, targets, matched, mask, no_match_logit=-1.0, unnamed_only=False)
    assert full.item() == pytest.approx((-np.log(1 / (3 + e)) + -np.log(e / (3 + e))) / 2, rel=1e-5)


def test_fine_cli_no_match_slot_trains_and_needs_its_companions(data_dir, tmp_path):
    out = tmp_path / "run"
    rec = _train_tiny(data_dir, out, 1, "--attribute-prompts", "0.8", "--omit-present", "0.5",
                      "--token-contrast", "1.0", "--no-match-logit", "-1.0")
    assert rec[0]["loss_token_contrast"] > 0
    stage = json.loads((out / "final" / "config.json").read_text())["stage"]
    assert stage["no_match_logit"] == -1.0 and "no_match_unnamed_only" not in stage   # the default: not written
    base = ["--data", str(data_dir), "--out", str(tmp_path / "refused"), "--config", "fiber-tiny-test",
            "--init", "none", "--max-steps", "1", "--no-progress"]
    for argv in (["--no-match-logit", "-1", "--omit-present", "0.5"],
                 ["--no-match-logit", "-1", "--token-contrast", "1.0"],
                 ["--omit-present", "0.5", "--token-contrast", "1.0", "--no-match-unnamed-only"]):  # no slot
        assert fine.main(fine.get_args_parser().parse_args(base + argv)) == 2
    assert not (tmp_path / "refused").exists()
    # --absent-only leaves objects unnamed as well: the slot takes it in place of --omit-present
    rec = _train_tiny(data_dir, tmp_path / "absent", 1, "--attribute-prompts", "0.8", "--absent-only", "0.5",
                      "--token-contrast", "1.0", "--no-match-logit", "-1.0")
    assert rec[0]["loss_token_contrast"] > 0


def test_fine_cli_logs_the_token_contrast_loss(data_dir, tmp_path):
    out = tmp_path / "run"
    rec = _train_tiny(data_dir, out, 1, "--attribute-prompts", "0.8", "--omit-present", "0.3",
                      "--token-contrast", "1.0")
    assert rec[0]["loss_token_contrast"] > 0
    stage = json.loads((out / "final" / "config.json").read_text())["stage"]
    assert stage["token_contrast"] == 1.0


def test_confusable_negatives_name_the_kinds_a_present_one_is_mistaken_for():
    from train.data import CONFUSABLE_KINDS

    assert set(CONFUSABLE_KINDS) == set(KINDS)
    assert all(set(v) <= set(KINDS) and k not in v for k, v in CONFUSABLE_KINDS.items())
    present = [("red", "arrow"), ("blue", "circle")]
    near = {("red", k) for k in CONFUSABLE_KINDS["arrow"]} | {("blue", k) for k in CONFUSABLE_KINDS["circle"]}
    same_colour_seen = 0
    for seed in range(40):
        negs = hard_negative_pairs(np.random.default_rng(seed), present, tuple(COLOURS), KINDS, 4, confusable=1.0)
        assert len(negs) == len(set(negs)) == 4 and not set(negs) & set(present)
        for c, k in negs:
            if c in ("red", "blue") and k not in ("arrow", "circle"):   # a same-colour negative
                assert (c, k) in near, (c, k)
                same_colour_seen += 1
    assert same_colour_seen >= 40
    # off (the default): the draws of the function before the option existed (pinned from it), so
    # the phases trained before it replay unchanged
    before = {0: [("pink", "arrow"), ("blue", "hexagon"), ("green", "circle"), ("blue", "arrow")],
              1: [("purple", "circle"), ("red", "star"), ("blue", "arrow"), ("blue", "diamond")],
              2: [("blue", "cross"), ("green", "circle"), ("blue", "star"), ("red", "circle")]}
    for seed, want in before.items():
        assert hard_negative_pairs(np.random.default_rng(seed), present, tuple(COLOURS), KINDS, 4) == want


def test_free_negatives_are_absent_pairs_drawn_without_regard_to_the_scene(data_dir):
    """--free-negatives: one or two more absent pairs per attribute item, from every pair not in
    the image (so some share neither its colours nor its kinds, which no hard negative does), each
    a negative for every box; 0 leaves the items as they were."""
    present, taken = [("red", "arrow"), ("blue", "circle")], [("red", "star")]
    unrelated = 0
    for seed in range(100):
        got = free_negative_pairs(np.random.default_rng(seed), present, tuple(COLOURS), KINDS, 2, taken)
        assert len(got) == len(set(got)) == 2 and not set(got) & (set(present) | set(taken))
        unrelated += sum(c not in ("red", "blue") and k not in ("arrow", "circle") for c, k in got)
    assert unrelated >= 100          # ~70% of the 96 - 3 pairs share nothing with the scene
    everything = [(c, k) for c in COLOURS for k in KINDS]
    assert free_negative_pairs(np.random.default_rng(0), everything[1:], tuple(COLOURS), KINDS, 2) == everything[:1]
    assert free_negative_pairs(np.random.default_rng(0), present, tuple(COLOURS), KINDS, 0) == []

    def items(free: float):
        return [(item, {f"{c} {k}" for c, k in scene})
                for item, scene in _attribute_items(data_dir, free_negatives=free)]

    def shares_nothing(name, present):
        c, k = name.split()
        return not any(c == p.split()[0] or k == p.split()[1] for p in present)

    free_items, plain_items = items(1.0), items(0.0)
    assert [i.prompt for i, _ in free_items] != [i.prompt for i, _ in plain_items]
    seen_free = 0
    for item, present in free_items:
        names = item.prompt.split(". ")
        seen_free += sum(shares_nothing(n, present) for n in names if present)
        for row in item.positive_map:                                      # boxes: own pair only
            assert _marked(item, row) in {p.replace(" ", "") for p in present}
    assert seen_free > 0
    assert not any(shares_nothing(n, present) for item, present in plain_items if present
                   for n in item.prompt.split(". "))
    with pytest.raises(ValueError, match="free-negatives"):
        AttributeOptions(attribute_prompts=1.0, free_negatives=1.5).check()


def test_decoy_kinds_name_an_absent_look_alike_kind_in_several_colours(data_dir):
    """--decoy-kinds: an attribute item also names a kind absent from the image, one a present
    object is mistaken for, in two or three colours (that object's among them), sometimes with a
    look-alike of the decoy in the object's colour; every decoy is a negative at every box, and 0
    leaves the items as they were."""
    present = [("blue", "triangle"), ("red", "arrow"), ("orange", "moon")]
    seconds = 0
    for seed in range(60):
        got = decoy_kind_pairs(np.random.default_rng(seed), present, tuple(COLOURS), KINDS)
        assert len(got) == len(set(got)) and not {k for _, k in got} & {k for _, k in present}
        decoy = got[0][1]
        assert any(decoy in CONFUSABLE_KINDS[k] and got[0][0] == c for c, k in present), got
        family = [p for p in got if p[1] == decoy]
        assert 2 <= len(family) <= 3 and len({c for c, _ in family}) == len(family)
        extra = [p for p in got if p[1] != decoy]
        assert len(extra) <= 1 and all(c == got[0][0] and k in CONFUSABLE_KINDS[decoy] for c, k in extra)
        seconds += len(extra)
    assert 10 <= seconds <= 50          # about half the time
    assert decoy_kind_pairs(np.random.default_rng(0), [], tuple(COLOURS), KINDS) == []
    everything = [(c, k) for c in COLOURS for k in KINDS]
    assert decoy_kind_pairs(np.random.default_rng(0), everything, tuple(COLOURS), KINDS) == []

    def items(decoys: float):
        return _attribute_items(data_dir, decoy_kinds=decoys)

    def absent_kind_family(item, scene):
        kinds = {k for _, k in scene}
        named = [n.split()[1] for n in item.prompt.split(". ")]
        return any(named.count(k) >= 2 and k not in kinds for k in set(named))

    decoy_items, plain_items = items(1.0), items(0.0)   # (two present colours can share a hard negative's kind)
    with_decoys = sum(absent_kind_family(i, scene) for i, scene in decoy_items if scene)
    without = sum(absent_kind_family(i, scene) for i, scene in plain_items if scene)
    assert with_decoys >= len(decoy_items) // 2 and with_decoys >= without + len(decoy_items) // 3, (with_decoys, without)
    for item, scene in decoy_items:                                         # boxes: own pair only
        for row in item.positive_map:
            assert _marked(item, row) in {f"{c}{k}" for c, k in scene}
    with pytest.raises(ValueError, match="decoy-kinds"):
        AttributeOptions(attribute_prompts=1.0, decoy_kinds=-0.1).check()


def test_fine_cli_word_targets_record_the_min_rule_for_the_package(data_dir, tmp_path):
    """train.fine --word-targets: the run's config scores phrases by the minimum over their tokens
    (head.phrase_score), which the package sections carry to the runtime; a run of the mean rule
    is a valid --init for it (the rule has no weights); the DyHead keeps the official mean."""
    from fiber.checkpoint import load_checkpoint
    from fiber.package import package_sections

    _train_tiny(data_dir, tmp_path / "plain", 1, "--attribute-prompts", "1.0")
    _train_tiny(data_dir, tmp_path / "words", 1, "--attribute-prompts", "1.0", "--word-targets",
                "--init", str(tmp_path / "plain"))
    _, plain, _ = load_checkpoint(tmp_path / "plain" / "final")
    _, words, _ = load_checkpoint(tmp_path / "words" / "final")
    assert (plain.head.phrase_score, words.head.phrase_score) == ("mean", "min")
    # the default is left out of the config dict, so configs written before the field compare equal
    assert "phrase_score" not in plain.to_dict()["head"] and words.to_dict()["head"]["phrase_score"] == "min"
    assert type(words).from_dict(words.to_dict()) == words
    assert "phrase_score" not in package_sections(plain, (16,))["postprocess"]
    assert package_sections(words, (16,))["postprocess"]["phrase_score"] == "min"
    golden = get_config("fiber-golden-fine")
    with pytest.raises(ValueError, match="scores phrases by the mean"):
        golden.replace(head=dataclasses.replace(golden.head, phrase_score="min"))


def test_attribute_scenes_of_chosen_sizes_and_the_sizes_option():
    import argparse

    from benchmarks.attributes import _sizes, make_scenes

    scenes = make_scenes(4, seed=3, sizes=[(320, 240), (384, 288)])
    assert {s.image.shape[:2] for s in scenes} <= {(240, 320), (288, 384)}
    assert _sizes("320x240, 384X288") == ((320, 240), (384, 288))
    for bad, why in (("320x", "WxH"), ("64x64", "outside 128..1024"), ("320x240,foo", "'foo'")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            _sizes(bad)


def test_canvas_probe_rules():
    """benchmarks.canvas_probe: the square letterbox, the image's aspect at about A x A pixels, the
    image's own size; canvases are multiples of 32 that hold the resized image."""
    from benchmarks.canvas_probe import CanvasRule, canvas_for

    assert canvas_for(384, 256, "square", 256) == (256 / 384, 171, 256, 256, 256)
    s, nw, nh, ch, cw = canvas_for(384, 256, "area", 256)      # portrait 2:3 -> 209 x 314 -> 224 x 320
    assert (nw, nh, ch, cw) == (209, 314, 320, 224) and abs(s - 256 / (384 * 256) ** 0.5) < 1e-12
    assert canvas_for(240, 320, "native", 256) == (1.0, 320, 240, 256, 320)
    rule = CanvasRule("area", 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    buf, info = rule(np.full((384, 256, 3), 200, np.uint8))
    assert buf.shape == (1, 3, 320, 224) and (info.new_w, info.new_h) == (209, 314)
    assert np.all(buf[0, :, :314, :209] != 0) and not buf[0, :, 314:].any() and not buf[0, :, :, 209:].any()


def test_canvas_probe_contrast_kinds_prompt():
    """--contrast-kinds: the prompt's phrases first, in order (their indices stay the scene's), then
    every kind of the generated world the prompt does not name, once each."""
    from benchmarks.canvas_probe import contrast_kinds_prompt
    from common.prompts import parse_phrases
    from fiber.data.synth import KINDS

    prompt = contrast_kinds_prompt("red star. blue arrow", ["star", "arrow"])
    phrases = [prompt[a:b] for [(a, b)] in parse_phrases(prompt)]
    assert phrases[:2] == ["red star", "blue arrow"]
    assert sorted(phrases[2:]) == sorted(k for k in KINDS if k not in ("star", "arrow"))
    assert len(phrases) == len(KINDS)


def test_twin_prompts_keep_some_phrases_shuffled_and_leave_the_item_unchanged(data_dir):
    """--twin-prompts: an attribute item carries a second prompt of some of its phrases in another
    order; the twin's phrase maps mark the same words in both prompts, and the item itself is the
    one drawn without twins (the twin is drawn last)."""
    plain = _attribute_items(data_dir, kind_prompts=0.3)
    twinned = _attribute_items(data_dir, kind_prompts=0.3, twin_prompts=1.0)
    tok = raw_tokenizer()
    kept, total, reordered = 0, 0, 0
    for (a, _), (b, scene) in zip(plain, twinned):
        assert a.twin is None and a.prompt == b.prompt and np.array_equal(a.positive_map, b.positive_map)
        t = b.twin
        assert t is not None and len(t.phrases) == len(t.twin_phrases) >= 1
        enc = tok.encode(b.prompt.lower())
        twin_text = tok.decode(t.input_ids.tolist())
        words_a = [" ".join(tok.id_to_token(int(i)) for i in np.asarray(enc.ids)[row > 0]) for row in t.phrases]
        words_b = [" ".join(tok.id_to_token(int(i)) for i in t.input_ids[row > 0]) for row in t.twin_phrases]
        assert words_a == words_b and all(words_a), (b.prompt, twin_text)
        held = {f"{c} {k}" for c, k in scene} | {c for c, _ in scene} | {k for _, k in scene}
        assert t.absent.tolist() == [w.replace(" ##", "") not in held for w in words_a], (words_a, scene)
        kept += len(t.phrases)
        total += len(b.prompt.split(". "))
        starts = [int(np.argmax(row > 0)) for row in t.phrases]   # where each sits in the item's prompt
        reordered += starts != sorted(starts)
    assert 0.3 < kept / total < 0.75, kept / total       # about half, at least one each
    assert reordered >= len(twinned) // 5, reordered    # shuffled, not only thinned
    with pytest.raises(ValueError, match="twin-prompts"):
        AttributeOptions(attribute_prompts=1.0, twin_prompts=1.5).check()


def test_prompt_invariance_loss_compares_a_phrase_across_its_two_prompts():
    from fiber.losses import phrase_probabilities
    from train.tasks import prompt_invariance_loss
    la = torch.full((5, 6), -8.0)
    la[2, 1:3] = 3.0                                   # "blue star" (tokens 1-2) strong at anchor 2
    lb = torch.full((5, 4), -8.0)
    pa = torch.zeros(1, 6); pa[0, 1:3] = 1
    pb = torch.zeros(1, 4); pb[0, 2:4] = 1             # the same phrase at tokens 2-3 of the twin
    assert phrase_probabilities(la, pa)[2, 0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    alike = lb.clone(); alike[2, 2:4] = 3.0
    assert prompt_invariance_loss([la], [pa], [alike], [pb]).item() == pytest.approx(0.0, abs=1e-9)
    la.requires_grad_(True)
    lb.requires_grad_(True)
    loss = prompt_invariance_loss([la], [pa], [lb], [pb], top_k=2)
    diff = torch.sigmoid(torch.tensor(3.0)) - torch.sigmoid(torch.tensor(-8.0))
    assert loss.item() == pytest.approx((diff.item() ** 2) / 2, rel=1e-4)   # anchor 2 differs, the other ~0
    loss.backward()
    assert la.grad[2, 1] > 0 and lb.grad[2, 2] < 0     # the strong one down, the weak one up
    assert la.grad[:, 0].abs().max() == 0              # tokens outside the phrase untouched
    assert prompt_invariance_loss([], [], [], []).item() == 0.0
    # absent-max: only phrases absent from the image, and only the higher score is pulled down
    la.grad = lb.grad = None
    loss = prompt_invariance_loss([la], [pa], [lb], [pb], top_k=2, rule="absent-max",
                                  absent=[torch.tensor([True])])
    assert loss.item() == pytest.approx((diff.item() ** 2) / 2, rel=1e-4)
    loss.backward()
    assert la.grad[2, 1] > 0 and (lb.grad is None or lb.grad.abs().max() == 0)
    present = prompt_invariance_loss([la], [pa], [lb], [pb], rule="absent-max", absent=[torch.tensor([False])])
    assert present.item() == 0.0
    with pytest.raises(ValueError, match="absent flag"):
        prompt_invariance_loss([la], [pa], [lb], [pb], rule="absent-max")


def test_fine_cli_prompt_invariance_is_logged_recorded_and_needs_attribute_items(data_dir, tmp_path):
    out = tmp_path / "run"
    rec = _train_tiny(data_dir, out, 2, "--attribute-prompts", "1.0", "--detection", "--no-grounding",
                      "--prompt-invariance", "1.0", "--invariance-rule", "absent-max")
    assert all(np.isfinite(r["loss_invariance"]) for r in rec)
    assert any(r["loss_invariance"] > 0 for r in rec)
    stage = json.loads((out / "final" / "config.json").read_text())["stage"]
    assert stage["prompt_invariance"] == 1.0 and stage["invariance_rule"] == "absent-max"
    bare = tmp_path / "bare"
    args = fine.get_args_parser().parse_args(
        ["--data", str(data_dir), "--out", str(bare), "--config", "fiber-tiny-test", "--init", "none",
         "--max-steps", "1", "--no-progress", "--prompt-invariance", "1.0"])
    assert fine.main(args) == 2 and not bare.exists()
