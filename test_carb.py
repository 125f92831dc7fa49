"""Tests for carb.py and eval.py, grouped like carb.py's sections. Expected values are worked out by hand or by an
independent route (numpy, a plain loop, CLIP's own forward pass), never by calling the code under test again.

    python -m pytest -q          # ~1-2 min on 2 CPU cores; writes only under pytest's tmp_path
"""
import argparse
import copy
import csv
import errno
import functools
import importlib
import itertools
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image

import carb
import eval as evaluation  # eval.py

with warnings.catch_warnings():  # the clip package imports pkg_resources, which warns on import
    warnings.simplefilter("ignore")
    import clip
    import clip.model

REPO = os.path.dirname(os.path.abspath(__file__))
C = len(carb.CLASS_NAMES)
torch.set_num_threads(1)  # tiny tensors: one thread is faster and does not oversubscribe the CPU next to other jobs


# ---------------------------------------------------------------------------------------------------
# helpers and fixtures: a tiny Cityscapes tree, a tiny random CLIP
# ---------------------------------------------------------------------------------------------------

# Each image's labelIds: (labelId, rows) bands, and the trainIds that must be found in it.
TRAIN_LABELS = [((23, slice(0, 20)), (11, slice(20, 40)), (7, slice(40, 64))),  # sky, building, road
                ((0, slice(0, 10)), (7, slice(10, 50)), (26, slice(50, 64)))]  # unlabeled, road, car
TRAIN_EXPECTED = [{10, 2, 0}, {0, 13}]
VAL_LABELS = [((23, slice(0, 16)), (11, slice(16, 32)), (7, slice(32, 56)), (26, slice(56, 64))),
              ((23, slice(0, 24)), (7, slice(24, 64)))]


def write_tree(root, h=64, w=128):
    """leftImg8bit/{split}/city/x_000000_00000N_leftImg8bit.png + gtFine/.../..._gtFine_labelIds.png."""
    rng = np.random.default_rng(0)
    for split, bands_per_image in (("train", TRAIN_LABELS), ("val", VAL_LABELS)):
        img_dir, gt_dir = root / "leftImg8bit" / split / "city", root / "gtFine" / split / "city"
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        for n, bands in enumerate(bands_per_image):
            lab = np.zeros((h, w), np.uint8)
            for label_id, rows in bands:
                lab[rows] = label_id
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                img_dir / f"x_000000_00000{n}_leftImg8bit.png")
            Image.fromarray(lab).save(gt_dir / f"x_000000_00000{n}_gtFine_labelIds.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and runs in this process are then bit-for-bit repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "cityscapes")


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    torch.manual_seed(0)
    model = clip.model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,
                            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                            transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_path):
    return carb.load_clip(str(tiny_clip_path), "cpu")


def cli(*args, home):
    """Run a script of the repo; one OpenMP thread (tiny tensors; avoids oversubscription next to other jobs),
    HOME in tmp so nothing can land in ~/.cache."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HOME=str(home))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


# ---------------------------------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------------------------------

def test_label_to_train_matches_cityscapes_table():
    known = {7: 0, 8: 1, 11: 2, 26: 13, 33: 18, 0: 255, 6: 255, 9: 255, 34: 255, 255: 255}
    for label_id, train_id in known.items():
        assert carb.LABEL_TO_TRAIN[label_id].item() == train_id, label_id
    kept = (carb.LABEL_TO_TRAIN < 255).nonzero().flatten().tolist()
    assert len(kept) == 19
    assert sorted(carb.LABEL_TO_TRAIN[kept].tolist()) == list(range(19))


def test_list_split_pairs_images_with_label_files(tree):
    images, gts = carb.list_split(str(tree), "train")
    city = os.path.join(str(tree), "{}", "train", "city")
    assert images == [os.path.join(city.format("leftImg8bit"), f"x_000000_00000{n}_leftImg8bit.png") for n in (0, 1)]
    assert gts == [os.path.join(city.format("gtFine"), f"x_000000_00000{n}_gtFine_labelIds.png") for n in (0, 1)]


def test_list_split_missing_folder_names_it(tmp_path):
    with pytest.raises(carb.CarbError, match=re.escape(os.path.join(str(tmp_path), "leftImg8bit", "val"))):
        carb.list_split(str(tmp_path), "val")


def test_image_level_labels_are_the_present_train_ids_and_cached(tree, tmp_path):
    _, gts = carb.list_split(str(tree), "train")
    expected = torch.zeros(2, C, dtype=torch.uint8)
    for i, ids in enumerate(TRAIN_EXPECTED):
        expected[i, sorted(ids)] = 1
    labels = carb.image_level_labels(gts, C, str(tmp_path / "cache"))
    assert labels.dtype == torch.uint8 and torch.equal(labels, expected)
    shutil.rmtree(tree / "gtFine" / "train")  # the second call must come from the cache
    assert torch.equal(carb.image_level_labels(gts, C, str(tmp_path / "cache")), expected)


def test_weak_train_set_yields_image_labels_size_and_reads_no_gt(tree, tmp_path):
    images, gts = carb.list_split(str(tree), "train")
    labels = carb.image_level_labels(gts, C, str(tmp_path / "cache"))
    shutil.rmtree(tree / "gtFine" / "train")
    # base 16x32 at scale 1: the 64x128 image becomes 16x32 (factor min(32/128, 16/64) = 1/4), padded to 32x64
    ds = carb.WeakTrainSet(images, labels, crop=(32, 64), base_size=(16, 32), scale_range=(1.0, 1.0), seed=0,
                           photometric=False)
    assert len(ds.images) == 2  # indexed by (sample number, image) pairs from InfiniteSampler
    for k, i in [(0, 0), (1, 1), (2, 0)]:
        item = ds[(k, i)]
        assert len(item) == 3
        img, lab, valid_hw = item
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 64)
        assert lab.dtype == torch.float32 and torch.equal(lab, labels[i].float())
        assert valid_hw.tolist() == [16, 32]
        assert img[:, 16:].eq(0).all() and img[:, :, 32:].eq(0).all()  # bottom/right padding
        assert img[:, :16, :32].float().std() > 10  # the real (random-noise) image is inside


def test_weak_train_set_random_crop_stays_inside_and_is_reproducible(tree, tmp_path):
    images, gts = carb.list_split(str(tree), "train")
    labels = carb.image_level_labels(gts, C, str(tmp_path / "cache"))
    ds = carb.WeakTrainSet(images, labels, crop=(32, 64), base_size=(64, 128), scale_range=(0.5, 2.0), seed=3)
    for k in range(6):
        img, _, valid_hw = ds[(k, k % 2)]
        assert img.shape == (3, 32, 64)
        assert 1 <= valid_hw[0] <= 32 and 1 <= valid_hw[1] <= 64
    fresh = carb.WeakTrainSet(images, labels, crop=(32, 64), base_size=(64, 128), scale_range=(0.5, 2.0), seed=3)
    assert torch.equal(ds[(5, 1)][0], fresh[(5, 1)][0])  # randomness from (seed, k), not global state


@pytest.mark.parametrize("r, size, valid", [
    # base 48x160, image 64x128: s = min(r * 160 / 128, r * 48 / 64) = 0.75 r (the short side binds)
    (1.0, (48, 96), (32, 64)),  # 48x96: a 32x64 crop inside it, no padding
    (0.5, (24, 48), (24, 48)),  # 24x48: the whole image, padded to 32x64
])
def test_weak_train_set_crop_of_a_fixed_scale_by_hand(r, size, valid, tree, tmp_path):
    """At scale_range (r, r) the rescale is known: each crop is a window (maybe mirrored) of the image resized to
    `size`, of the size worked out by hand; different sample numbers k give different crops."""
    images, gts = carb.list_split(str(tree), "train")
    labels = carb.image_level_labels(gts, C, str(tmp_path / "cache"))
    ds = carb.WeakTrainSet(images, labels, crop=(32, 64), base_size=(48, 160), scale_range=(r, r), seed=3,
                           photometric=False)
    resized = TF.resize(carb.read_file(images[0]), list(size), antialias=True)  # torchvision, not carb
    h, w = valid
    crops = []
    for k in range(6):
        img, _, valid_hw = ds[(k, 0)]
        assert img.shape == (3, 32, 64) and valid_hw.tolist() == [h, w]
        assert img[:, h:].eq(0).all() and img[:, :, w:].eq(0).all()  # padding: bottom/right, zeros
        crop = img[:, :h, :w]
        windows = [(top, left, flip) for top in range(size[0] - h + 1) for left in range(size[1] - w + 1)
                   for flip in (False, True)
                   if torch.equal(crop, resized[:, top:top + h, left:left + w].flip(-1) if flip
                                  else resized[:, top:top + h, left:left + w])]
        assert windows, k  # the crop is a window of the rescaled image: it stays inside
        crops.append(crop)
    distinct = {c.numpy().tobytes() for c in crops}
    # 48x96: 17 x 33 positions x 2 flips, so 6 samples are 6 different crops; 24x48: only the flip can change
    assert len(distinct) == (6 if size == (48, 96) else 2)


def test_render_scene_is_a_street():
    rgb, lab = carb.render_scene(np.random.default_rng(0), 64, 128)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 128, 3)
    assert lab.dtype == np.uint8 and lab.shape == (64, 128)
    present = set(np.unique(lab).tolist())
    assert present <= set(carb.SYNTH_COLORS)
    assert {23, 7} <= present


# ---------------------------------------------------------------------------------------------------
# 2. CLIP pseudo-masks (MaskCLIP)
# ---------------------------------------------------------------------------------------------------

def test_templates():
    assert len(carb.TEMPLATES) == 85
    assert "there is a {} in the scene." in carb.TEMPLATES
    assert all(t.count("{}") == 1 for t in carb.TEMPLATES)
    assert len(set(carb.TEMPLATES)) == 85


@pytest.mark.parametrize("name", ["ViT-Nope/99", "missing.pt"])  # an unknown clip.load name; a file not there
def test_load_clip_unknown_name_or_missing_file_is_named(name, tmp_path):
    name = name if "/" in name else str(tmp_path / name)
    with pytest.raises(carb.CarbError, match=re.escape(f"--clip-model {name}: cannot load it")):
        carb.load_clip(name, "cpu")


def test_clip_runs_in_fp32_even_where_clip_load_gives_fp16(tiny_clip_path, monkeypatch):
    """On CUDA clip.load keeps fp16 weights; the official ViT runs in fp32, and so does carb's, on every device."""
    load = clip.load
    monkeypatch.setattr(clip, "load", lambda *a, **k: (load(*a, **k)[0].half(), None))  # as clip.load on CUDA
    model = carb.load_clip(str(tiny_clip_path), "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_text_classifier_matches_hand_computed_prompt_ensemble(tiny_clip):
    classifier = carb.text_classifier(tiny_clip, ["car", "tree"])
    assert classifier.shape == (2, 32)
    np.testing.assert_allclose(classifier.norm(dim=1).numpy(), [1, 1], atol=1e-5)
    with torch.no_grad():  # CLIP's text encoder on the 85 prompts; normalize, average, renormalize in numpy
        e = tiny_clip.encode_text(clip.tokenize([t.format("car") for t in carb.TEMPLATES])).numpy()
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(classifier[0].numpy(), e / np.linalg.norm(e), atol=1e-5)
    assert not torch.allclose(classifier[0], classifier[1])


def test_cache_is_used_while_its_files_stay_and_recomputed_when_one_changes(tmp_path, capsys):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for f in files:
        f.write_text("one")
    calls = []

    def compute():
        calls.append(1)
        return torch.full((2,), float(len(calls)))

    path = str(tmp_path / "cache.pt")
    assert carb.cached(path, files, compute, "thing").tolist() == [1, 1]
    assert carb.cached(path, files, compute, "thing").tolist() == [1, 1] and len(calls) == 1  # from the cache
    files[1].write_text("other")  # same folder, same name, new contents
    assert carb.cached(path, files, compute, "thing").tolist() == [2, 2]
    assert capsys.readouterr().out.strip() == (f"carb.py: thing: 1 of the files changed since cached, the first "
                                               f"{files[1]}: computing them again")


def reference_maskclip(model, images, classifier):
    """MaskCLIP from the spec, through CLIP's own forward pass: a hook takes the tokens entering the last block;
    there, attention restricted to each token itself (diagonal mask) is exactly the value path."""
    vit = copy.deepcopy(model.visual)
    b, gh, gw, n = images.shape[0], images.shape[-2] // 16, images.shape[-1] // 16, vit.input_resolution // 16
    if (gh, gw) != (n, n):  # positional embedding resized (bicubic) to the patch grid
        pos = vit.positional_embedding.detach()
        grid = pos[1:].T.reshape(1, -1, n, n)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False).reshape(-1, gh * gw).T
        vit.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid]))
    last, seen = vit.transformer.resblocks[-1], {}
    last.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    with torch.no_grad():
        vit(images)
        x = seen["x"]  # [1 + gh*gw, B, width]
        y = last.ln_1(x)
        self_only = torch.full((len(x), len(x)), float("-inf")).fill_diagonal_(0)
        x = x + last.attn(y, y, y, need_weights=False, attn_mask=self_only)[0]
        x = x + last.mlp(last.ln_2(x))
        patches = vit.ln_post(x[1:]) @ vit.proj  # [gh*gw, B, D]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        text = classifier / classifier.norm(dim=-1, keepdim=True)
        return torch.einsum("nbd,cd->bcn", patches, text).reshape(b, -1, gh, gw)


@pytest.fixture
def unit_classifier():
    return F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(1)), dim=1)


def test_maskclip_scores_native_grid_matches_reference(tiny_clip, unit_classifier):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = carb.maskclip_scores(tiny_clip, images, unit_classifier)
    assert scores.shape == (2, 5, 2, 2)
    torch.testing.assert_close(scores, reference_maskclip(tiny_clip, images, unit_classifier), atol=1e-5, rtol=1e-4)


def test_maskclip_scores_non_square_grid_matches_reference(tiny_clip, unit_classifier):
    images = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    scores = carb.maskclip_scores(tiny_clip, images, unit_classifier)
    assert scores.shape == (1, 5, 3, 5)
    assert scores.abs().max() <= 1 + 1e-5  # cosine similarities
    torch.testing.assert_close(scores, reference_maskclip(tiny_clip, images, unit_classifier), atol=1e-5, rtol=1e-4)


def test_maskclip_scores_rounds_to_whole_patches(tiny_clip, unit_classifier):
    images = torch.randn(1, 3, 36, 90, generator=torch.Generator().manual_seed(0))
    scores = carb.maskclip_scores(tiny_clip, images, unit_classifier)
    assert scores.shape == (1, 5, 2, 6)  # 36/16 = 2.25 -> 2, 90/16 = 5.6 -> 6
    resized = F.interpolate(images, size=(32, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(scores, reference_maskclip(tiny_clip, resized, unit_classifier), atol=1e-5, rtol=1e-4)


def test_pseudo_mask_only_labelled_classes_win():
    # class 2 has the highest score everywhere but is not in the image's labels
    scores = torch.tensor([[[[0.9, 0.1]], [[0.2, 0.8]], [[5.0, 5.0]]]])  # [1, 3, 1, 2]
    mask = carb.pseudo_mask(scores, torch.tensor([[1.0, 1.0, 0.0]]), (1, 2))
    assert mask.tolist() == [[[0, 1]]]
    only_2 = carb.pseudo_mask(scores, torch.tensor([[0.0, 0.0, 1.0]]), (1, 2))
    assert only_2.tolist() == [[[2, 2]]]


def test_pseudo_mask_without_labels_is_all_ignore():
    scores = torch.randn(2, 3, 2, 2)
    mask = carb.pseudo_mask(scores, torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (4, 4))
    assert (mask[0] == 255).all() and (mask[1] == 1).all()


def test_pseudo_mask_upsamples_bilinearly():
    # width 2 -> 3 (align_corners=False): source x = -1/6 (clamped to 0), 1/2, 7/6 (clamped to 1). In the middle
    # the scores are the average, (0.5, 0.5, 0.6), so class 2 wins there; nearest would give [0, 0, 1].
    scores = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.6]]]])
    mask = carb.pseudo_mask(scores, torch.tensor([[1.0, 1.0, 1.0]]), (2, 3))
    assert mask.shape == (1, 2, 3) and mask.dtype == torch.long
    assert mask.tolist() == [[[0, 2, 1]] * 2]


def test_simulated_clip_shape_determinism_and_classifier():
    sim = carb.SimulatedCLIP()
    x = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    out = sim(x)
    assert out.shape == (2, C, 16, 32)  # 4-px patches: Cityscapes' 16 px at the stand-in's quarter scale
    assert torch.equal(out, carb.SimulatedCLIP()(x.clone()))
    t = sim.text_classifier
    torch.testing.assert_close(t @ t.T, torch.eye(C), atol=1e-5, rtol=0)
    # an image of one scene colour, without noise, as training feeds it (CLIP-normalized): that class at every patch
    quiet = carb.SimulatedCLIP(noise=0)
    for label_id, train_id in {7: 0, 23: 10, 26: 13}.items():  # road, sky, car (the Cityscapes table)
        colour = torch.tensor(carb.SYNTH_COLORS[label_id][1], dtype=torch.float32) / 255
        image = TF.normalize(colour[:, None, None].expand(3, 48, 80)[None], carb.CLIP_MEAN, carb.CLIP_STD)
        scores = quiet(image)
        assert scores.shape == (1, C, 12, 20)
        assert scores.argmax(1).eq(train_id).all(), (label_id, scores.argmax(1))


def row_runs(mask):
    """Lengths of the runs of True in each row of a boolean array, by itertools (not eval.runs)."""
    return [len(list(g)) for row in mask for value, g in itertools.groupby(row) if value]


def test_stand_in_is_cityscapes_at_a_quarter_scale():
    """Scene, crop, window and CLIP patch are each a quarter of Cityscapes' (1024x2048, 512x1024, 512x256, ViT-B/16's
    16 px), so each is the same fraction of the scene; the rescale range and the window's m are the official ones."""
    syn, city = carb.DEFAULTS["synthetic"], carb.DEFAULTS["cityscapes"]
    assert [4 * s for s in syn["base_size"]] == [1024, 2048] and [4 * s for s in syn["crop"]] == [512, 1024]
    assert [4 * s for s in syn["window"]] == [512, 256] and 4 * carb.SimulatedCLIP().patch == 16
    assert syn["scale_range"] == city["scale_range"] == (0.5, 2.0) and syn["multiplier"] == (1.0, 1.0)
    assert evaluation.runs(np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)).tolist() == [2, 1, 4]


def test_stand_in_small_objects_are_as_large_in_patches_as_on_cityscapes():
    """The median width of each small class's pixel runs, in SimulatedCLIP's 4-px patches, lies where Cityscapes'
    camera puts the same object at 10-60 m in ViT-B/16's 16-px patches: 2262.5 px * width / d / 16, by hand --
    pole 0.15 m: 0.35-2.1; traffic light 0.3 m: 0.71-4.2; person 0.5 m: 1.2-7.1; sign 0.6 m: 1.4-8.5."""
    rng = np.random.default_rng(7)
    labels = [carb.render_scene(rng, 256, 512)[1] for _ in range(10)]
    widths = [statistics.median(n for lab in labels for n in row_runs(lab == label_id)) / 4 for label_id in
              (17, 19, 24, 20)]  # pole, traffic light, person, traffic sign: their physical widths' order
    for width, (lo, hi) in zip(widths, [(0.35, 2.1), (0.71, 4.2), (1.2, 7.1), (1.4, 8.5)]):
        assert lo <= width <= hi, widths
    assert widths == sorted(widths), widths


def test_simulated_clip_recovers_small_objects_at_x2():
    """CLIP's first failure: on rendered val scenes, more pole, traffic light and sign pixels are right in the x2
    view than in the original -- counted against the scene's own label map, which the scorer never sees."""
    rng, sim, right = np.random.default_rng([0, True]), carb.SimulatedCLIP(), {1: 0, 2: 0}
    for _ in range(4):
        rgb, lab = carb.render_scene(rng, 256, 512)
        gt = carb.LABEL_TO_TRAIN[torch.from_numpy(lab).long()]
        labels = (torch.bincount(gt[gt != 255].long(), minlength=C)[:C] > 0).float()  # the scene's classes
        small = (gt == 5) | (gt == 6) | (gt == 7)  # trainIds of pole, traffic light, traffic sign
        for scale in right:
            mask = evaluation.clip_view(sim, torch.from_numpy(rgb).permute(2, 0, 1), labels, scale, 1)
            right[scale] += (mask[small] == gt[small]).sum().item()
    assert right[2] > 1.2 * right[1] > 0, right


# ---------------------------------------------------------------------------------------------------
# 3. Global-local view
# ---------------------------------------------------------------------------------------------------

def test_sample_window_inside_crop():
    tops, lefts = set(), set()
    for seed in range(300):
        top, left, h, w, m = carb.sample_window((32, 64), (16, 48), 0.5, 1.25, torch.Generator().manual_seed(seed))
        assert (h, w) == (16, 48)
        assert 0 <= top <= 16 and 0 <= left <= 16
        assert top + h <= 32 and left + w <= 64
        assert 1.25 <= m < 1.75
        tops.add(top)
        lefts.add(left)
    assert {0, 16} <= tops and {0, 16} <= lefts  # both extremes reachable


def test_sample_window_larger_than_crop_is_the_crop():
    top, left, h, w, m = carb.sample_window((32, 64), (64, 100), 0.0, 2.0, torch.Generator().manual_seed(0))
    assert (top, left, h, w, m) == (0, 0, 32, 64, 2.0)



# ---------------------------------------------------------------------------------------------------
# 4. Model
# ---------------------------------------------------------------------------------------------------

def test_stride8_backbone_is_torchvisions_mobilenet_first_seven_blocks():
    torch.manual_seed(0)
    model = carb.Segmenter("mobilenet_v3_stride8", torch.randn(C, 24)).eval()
    reference = torchvision.models.mobilenet_v3_large().features[:7].eval()  # the independent route
    reference.load_state_dict(model.net.backbone.state_dict())  # strict: the same modules, names and shapes
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        feats = model.net.backbone(x)["out"]
        assert feats.shape == (2, 40, 6, 10)  # stride 8, finer than CLIP's 16
        assert torch.allclose(feats, reference(x), atol=1e-6)
        assert model(x).shape == (2, C, 48, 80)


def test_segmenter_logits_are_the_embedding_dot_text_classifier():
    classifier = F.normalize(torch.randn(C, 24), dim=-1)
    model = carb.Segmenter("mobilenet_v3_stride8", classifier).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        embedding = model.net.classifier(model.net.backbone(x)["out"])[0]  # [24, 4, 4]
        logits = model(x)
    by_hand = sum(classifier[:, d, None, None] * embedding[d] for d in range(24))  # [C, 4, 4]
    expected = F.interpolate(by_hand[None], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert "text_classifier" in dict(model.named_buffers()) and "text_classifier" not in dict(model.named_parameters())


@pytest.mark.parametrize("backbone", list(carb.BACKBONES))
def test_segmenter_has_no_dropout_two_train_forwards_are_equal(backbone):
    """The official ASPPHeadV2 has no dropout (dropout_ratio=0): CARB's P, taken from the training forward, must not
    be random. BatchNorm's running statistics are frozen (momentum 0); train mode still uses the batch's."""
    torch.manual_seed(0)
    model = carb.Segmenter(backbone, F.normalize(torch.randn(C, 16), dim=-1)).train()
    assert not [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_segmenter_upsamples_the_logits_in_fp32_under_bf16_autocast():
    """CUDA's bf16 backward of bilinear upsampling sums in bf16; carb upsamples in fp32. Shown under CPU autocast."""
    torch.manual_seed(0)
    classifier = F.normalize(torch.randn(C, 24), dim=-1)
    model = carb.Segmenter("mobilenet_v3_stride8", classifier).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        embedding = model.net.classifier(model.net.backbone(x)["out"])
    assert embedding.dtype == torch.bfloat16 and logits.dtype == torch.float32  # the network in bf16, not its output
    low = torch.einsum("bdhw,cd->bchw", embedding, classifier.to(torch.bfloat16)).float()
    expected = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, expected, atol=1e-6)

# ---------------------------------------------------------------------------------------------------
# 5. CARB loss
# ---------------------------------------------------------------------------------------------------

# B=1, C=3, H=1, W=5; class 2 is not in the image's labels. Columns:
#   0: argmax 0, pseudo 0 -> consistent
#   1: argmax over all = 2, over labelled = 1, pseudo 1 -> consistent (only thanks to the restriction)
#   2: pseudo 255 -> ignored
#   3: prediction 0, pseudo 1 -> inconsistent
#   4: prediction 1, pseudo 0 -> inconsistent
LOGITS = np.array([[2.0, 0.2, 1.0, 1.5, 0.0],
                   [0.5, 1.0, 0.0, -0.5, 2.0],
                   [-1.0, 3.0, 0.0, 0.3, 0.5]])
PSEUDO = [0, 1, 255, 1, 0]
LABELS = [1.0, 1.0, 0.0]


def nll(col, target):
    """-log_softmax(LOGITS[:, col])[target] in numpy."""
    z = LOGITS[:, col]
    return -(z[target] - z.max() - np.log(np.exp(z - z.max()).sum()))


CE_C = (nll(0, 0) + nll(1, 1)) / 2
CE_I = (nll(3, 1) + nll(4, 0)) / 2


def carb_inputs():
    logits = torch.tensor(LOGITS, dtype=torch.float32).reshape(1, 3, 1, 5).requires_grad_()
    return logits, torch.tensor([PSEUDO]).reshape(1, 1, 5), torch.tensor([LABELS])


def test_region_losses_regions_and_carb_loss_with_a_float_weight():
    logits, mask, labels = carb_inputs()
    ce_c, ce_i, consistent, inconsistent = carb.region_losses(logits, mask, labels)
    assert consistent.tolist() == [[[True, True, False, False, False]]]  # columns 0 and 1, by the table above
    assert inconsistent.tolist() == [[[False, False, False, True, True]]]  # column 2 is ignored: in neither
    assert ce_c.item() == pytest.approx(CE_C, rel=1e-5)
    assert ce_i.item() == pytest.approx(CE_I, rel=1e-5)
    loss = carb.carb_loss(logits, mask, labels, 0.25)
    assert loss.item() == pytest.approx(CE_C + 0.25 * CE_I, rel=1e-5)


def test_carb_loss_gradient_by_hand():
    logits, mask, labels = carb_inputs()
    carb.carb_loss(logits, mask, labels, 0.25).backward()
    # d CE / d z = softmax(z) - onehot, divided by the region size (2 each), times 0.25 for the inconsistent one
    expected = np.zeros_like(LOGITS)
    for col, scale in [(0, 0.5), (1, 0.5), (3, 0.125), (4, 0.125)]:
        p = np.exp(LOGITS[:, col] - LOGITS[:, col].max())
        p /= p.sum()
        p[PSEUDO[col]] -= 1
        expected[:, col] = scale * p
    grad = logits.grad.reshape(3, 5).numpy()
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, expected, atol=1e-6)  # column 2 (ignored) gets exactly 0


def test_carb_loss_is_pure_and_takes_only_a_float():
    logits, mask, labels = carb_inputs()
    balancer = carb.RegionBalancer()
    first = carb.carb_loss(logits, mask, labels, 0.5)
    assert carb.carb_loss(logits, mask, labels, 0.5).item() == first.item()  # no state between calls
    assert balancer.consistent == [] and first.item() == pytest.approx(CE_C + 0.5 * CE_I, rel=1e-5)
    with pytest.raises(TypeError):
        carb.carb_loss(logits, mask, labels, lambda c, i: 0.5)  # the float-or-callable weight is gone


def test_carb_loss_all_consistent_gives_zero_inconsistent_ce():
    logits, _, labels = carb_inputs()
    mask = torch.tensor([[[0, 1, 255, 0, 1]]])  # the labelled argmax everywhere
    ce_c, ce_i, _, inconsistent = carb.region_losses(logits, mask, labels)
    expected_c = (nll(0, 0) + nll(1, 1) + nll(3, 0) + nll(4, 1)) / 4
    assert ce_i.item() == 0.0 and not inconsistent.any()
    assert ce_c.item() == pytest.approx(expected_c, rel=1e-5)
    assert carb.carb_loss(logits, mask, labels, 7.0).item() == pytest.approx(expected_c, rel=1e-5)


def test_carb_loss_all_ignored_is_exactly_zero():
    logits, _, labels = carb_inputs()
    mask = torch.full((1, 1, 5), 255)
    ce_c, ce_i, _, _ = carb.region_losses(logits, mask, labels)
    loss = carb.carb_loss(logits, mask, labels, 1.0)
    assert loss.item() == 0.0 and ce_c.item() == 0.0 and ce_i.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_premise_report_against_a_hand_computed_case(capsys):
    """The loss table's image with GT [0, 0, 1, 1, ignore]: column 4 drops out (no GT), column 2 is unlabelled in the
    mask. R_c = columns 0 (mask 0, GT 0: right) and 1 (mask 1, GT 0: wrong); R_i = column 3 (mask 1, GT 1: right)."""
    logits, mask, labels = carb_inputs()
    gt = torch.tensor([[0, 0, 1, 1, 255]])
    pixels, correct, ce = evaluation.premise_counts(logits[0].detach(), mask[0], gt, labels[0], 3)
    assert pixels.tolist() == [[1, 1, 0], [0, 1, 0]] and correct.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert ce.tolist() == pytest.approx([nll(0, 0) + nll(1, 1), nll(3, 1)], rel=1e-5)
    figures = evaluation.premise_report(pixels, correct, ce, ["a", "b", "c"])
    assert figures["R_c share"] == pytest.approx(200 / 3) and figures["R_i share"] == pytest.approx(100 / 3)
    assert figures["accuracy in R_c"] == 50.0 and figures["accuracy in R_i"] == 100.0
    assert figures["w"] == pytest.approx((nll(0, 0) + nll(1, 1)) / 2 / nll(3, 1), rel=1e-5)
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:5]}
    assert rows["a"] == ["1", "0.0", "100.0", "nan"] and rows["b"] == ["2", "50.0", "0.0", "100.0"]


def test_region_balancer_window_mean_ratio():
    balancer = carb.RegionBalancer(coeff=0.5, window=3)
    pushes = [(1, 2), (2, 2), (3, 4), (4, 8), (5, 1)]
    # 0.5 * mean(last 3 c) / mean(last 3 i), by hand
    expected = [0.5 * 1 / 2, 0.5 * 1.5 / 2, 0.5 * 2 / (8 / 3), 0.5 * 3 / (14 / 3), 0.5 * 4 / (13 / 3)]
    for (c, i), w in zip(pushes, expected):
        assert balancer.update(torch.tensor(float(c)), torch.tensor(float(i))) == pytest.approx(w)
        assert balancer.weight == pytest.approx(w)


def test_region_balancer_zero_inconsistent_gives_coeff():
    balancer = carb.RegionBalancer(coeff=0.7, window=5)
    assert balancer.update(1.3, 0.0) == 0.7 and balancer.weight == 0.7


def test_region_balancer_state_round_trip(tmp_path):
    a = carb.RegionBalancer()
    for c, i in [(1.0, 2.0), (0.5, 3.0), (2.0, 1.0), (1.5, 1.5), (0.2, 4.0), (3.0, 1.0)]:
        a.update(c, i)
    torch.save(a.state_dict(), tmp_path / "b.pt")  # as in a checkpoint
    b = carb.RegionBalancer()
    b.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    assert b.weight == a.weight
    for c, i in [(1.0, 1.0), (4.0, 0.5), (0.1, 2.0)]:
        assert b.update(c, i) == a.update(c, i)


def test_masked_cross_entropy_matches_torch_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0] = 255
    target[1, :, 2] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(carb.masked_cross_entropy(logits, target), expected)


def test_masked_cross_entropy_all_ignored_is_zero():
    out = carb.masked_cross_entropy(torch.randn(1, 4, 2, 2), torch.full((1, 2, 2), 255))
    assert out.item() == 0.0


# ---------------------------------------------------------------------------------------------------
# 6. Training step: the two views, and the ablation's variants of it
# ---------------------------------------------------------------------------------------------------

def step_setup():
    """A fixed batch, a scorer that records the sizes it sees, and a 1x1-conv 'model'."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    labels = torch.zeros(2, C)
    labels[:, [0, 2, 10, 13]] = 1
    batch = (images, labels, torch.tensor([[32, 64], [32, 64]]))
    projection = torch.randn(C, 3, 1, 1)
    seen = []

    def scorer(x):
        seen.append(tuple(x.shape[-2:]))
        return F.conv2d(F.avg_pool2d(x, 16), projection)

    return batch, scorer, seen, nn.Conv2d(3, C, 1)


def by_hand_ce(logits, mask, labels, weight=None):
    """Mean CE over the non-ignored pixels; with a weight: CE(consistent) + weight * CE(inconsistent)."""
    ce = F.cross_entropy(logits, mask, ignore_index=255, reduction="none")
    valid = mask != 255
    if weight is None:
        return ce[valid].mean()
    prediction = torch.where(labels[:, :, None, None] > 0, logits, torch.tensor(-1e9)).argmax(1)
    agree = valid & (prediction == mask)
    return ce[agree].mean() + weight * ce[valid & ~agree].mean()


def sgd_step(model):
    """(a copy of `model` as it is now, an SGD optimizer with lr 1 for `model`): after one step each parameter of
    `model` must be the copy's minus the gradient of the by-hand loss at the copy."""
    return copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=1.0)


def assert_stepped(model, before, expected_loss):
    expected_loss.backward()
    for p, q in zip(model.parameters(), before.parameters()):
        torch.testing.assert_close(p.detach(), (q - q.grad).detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("carb_on", [False, True])
def test_train_one_step_global_and_local_views(carb_on):
    """Image 1 of the batch is padding below row 20 and right of column 40 (valid_hw 20x40 in the 32x64 crop): those
    pixels are ignored (255) in the global mask and in the local one (window rows 8-24, columns 16-48). The step is
    whole: the weights come back moved by one SGD step on the by-hand loss of both views."""
    batch, scorer, seen, model = step_setup()
    images, labels, valid_hw = batch
    images[1, :, 20:], images[1, :, :, 40:] = 0, 0  # as WeakTrainSet pads
    valid_hw[1] = torch.tensor([20, 40])
    window = (8, 16, 16, 32, 1.5)  # top, left, h, w, m
    before, optimizer = sgd_step(model)
    logs = carb.train_one_step(model, optimizer, scorer, batch, window, carb_on, 0.03, torch.device("cpu"))
    assert seen == [(32, 64), (24, 48)]  # CLIP on the crop, then on the window up-scaled x1.5
    x = images.float() / 255
    clip_x = TF.normalize(x, carb.CLIP_MEAN, carb.CLIP_STD)
    logits = before(TF.normalize(x, carb.IMAGENET_MEAN, carb.IMAGENET_STD))
    global_mask = carb.pseudo_mask(scorer(clip_x), labels, (32, 64))
    local_clip = F.interpolate(clip_x[:, :, 8:24, 16:48], size=(24, 48), mode="bilinear", align_corners=False)
    local_mask = carb.pseudo_mask(scorer(local_clip), labels, (16, 32))
    padding = torch.zeros(2, 32, 64, dtype=torch.bool)
    padding[1, 20:], padding[1, :, 40:] = True, True
    assert padding[:, 8:24, 16:48].any()  # the window reaches into the padding
    weight = 0.03 if carb_on else None
    unpadded = (by_hand_ce(logits, global_mask, labels, weight)
                + by_hand_ce(logits[:, :, 8:24, 16:48], local_mask, labels, weight))
    global_mask[padding], local_mask[padding[:, 8:24, 16:48]] = 255, 255
    global_loss = by_hand_ce(logits, global_mask, labels, weight)
    local_loss = by_hand_ce(logits[:, :, 8:24, 16:48], local_mask, labels, weight)
    assert logs["global"] == pytest.approx(global_loss.item(), rel=1e-5)
    assert logs["local"] == pytest.approx(local_loss.item(), rel=1e-5)
    assert abs(logs["global"] + logs["local"] - unpadded.item()) > 1e-3  # the padding would have counted
    assert ("w" in logs) == carb_on and logs.get("w", 0.03) == 0.03
    # the region fractions of the log, over the unpadded pixels only
    prediction = torch.where(labels[:, :, None, None] > 0, logits, torch.tensor(-1e9)).argmax(1)
    agree = (prediction == global_mask) & ~padding
    assert logs["consistent"] == pytest.approx(agree.sum().item() / (~padding).sum().item())
    assert logs["consistent"] + logs["inconsistent"] == pytest.approx(1)
    assert logs["ce_c"] == pytest.approx(by_hand_ce(logits, torch.where(agree, global_mask, 255), labels).item(),
                                         rel=1e-5)
    assert_stepped(model, before, global_loss + local_loss)


def test_train_one_step_without_local_view_is_global_only():
    batch, scorer, seen, model = step_setup()
    before, optimizer = sgd_step(model)
    logs = carb.train_one_step(model, optimizer, scorer, batch, None, True, 0.5, torch.device("cpu"))
    assert seen == [(32, 64)]  # no second CLIP pass
    x = batch[0].float() / 255
    logits = before(TF.normalize(x, carb.IMAGENET_MEAN, carb.IMAGENET_STD))
    global_mask = carb.pseudo_mask(scorer(TF.normalize(x, carb.CLIP_MEAN, carb.CLIP_STD)), batch[1], (32, 64))
    expected = by_hand_ce(logits, global_mask, batch[1], 0.5)
    assert logs["global"] == pytest.approx(expected.item(), rel=1e-5)
    assert "local" not in logs and logs["w"] == 0.5
    assert_stepped(model, before, expected)


def test_train_one_step_queues_only_the_global_views_ces_and_the_local_view_reuses_its_w():
    """The balancer gets one update per step, with the global view's CE(R_c) and CE(R_i); the local view is weighted
    by the w that update returned (a balancer passed to both views would have queued the local CEs too)."""
    batch, scorer, _, model = step_setup()
    images, labels, _ = batch
    balancer = carb.RegionBalancer()
    balancer.update(0.4, 2.0)  # an earlier iteration's CEs
    before, optimizer = sgd_step(model)
    window = (8, 16, 16, 32, 1.5)
    logs = carb.train_one_step(model, optimizer, scorer, batch, window, True, balancer, torch.device("cpu"))
    x = images.float() / 255
    clip_x = TF.normalize(x, carb.CLIP_MEAN, carb.CLIP_STD)
    logits = before(TF.normalize(x, carb.IMAGENET_MEAN, carb.IMAGENET_STD))
    global_mask = carb.pseudo_mask(scorer(clip_x), labels, (32, 64))
    prediction = torch.where(labels[:, :, None, None] > 0, logits, torch.tensor(-1e9)).argmax(1)
    agree = prediction == global_mask
    ce_c = by_hand_ce(logits, torch.where(agree, global_mask, 255), labels).item()
    ce_i = by_hand_ce(logits, torch.where(~agree, global_mask, 255), labels).item()
    assert balancer.consistent == pytest.approx([0.4, ce_c], rel=1e-5)  # one entry per step: the global view's
    assert balancer.inconsistent == pytest.approx([2.0, ce_i], rel=1e-5)
    w = (0.4 + ce_c) / (2.0 + ce_i)  # queued before it is read, as in the official head
    assert logs["w"] == pytest.approx(w, rel=1e-5)
    local_clip = F.interpolate(clip_x[:, :, 8:24, 16:48], size=(24, 48), mode="bilinear", align_corners=False)
    local_mask = carb.pseudo_mask(scorer(local_clip), labels, (16, 32))
    local_loss = by_hand_ce(logits[:, :, 8:24, 16:48], local_mask, labels, w)
    assert logs["local"] == pytest.approx(local_loss.item(), rel=1e-5)
    assert_stepped(model, before, by_hand_ce(logits, global_mask, labels, w) + local_loss)


# ---------------------------------------------------------------------------------------------------
# 6b. Evaluation
# ---------------------------------------------------------------------------------------------------

def test_iou_from_confusion_and_mean_iou():
    conf = torch.tensor([[5, 1, 0, 2],  # rows = GT, columns = prediction
                         [0, 0, 0, 0],  # class 1: predicted (4 px) but absent from GT -> IoU 0, counted
                         [0, 0, 0, 0],  # class 2: in neither -> NaN, left out
                         [1, 3, 0, 4]])
    iou = carb.iou_from_confusion(conf)
    assert iou[0].item() == pytest.approx(5 / 9)  # tp 5, union 8 + 6 - 5
    assert iou[1].item() == 0.0
    assert math.isnan(iou[2].item())
    assert iou[3].item() == pytest.approx(4 / 10)  # tp 4, union 8 + 6 - 4
    assert carb.mean_iou(iou) == pytest.approx(100 * (5 / 9 + 0 + 0.4) / 3)


def test_confusion_matrix_matches_loop():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (2, 6, 7))
    gt[rng.random(gt.shape) < 0.3] = 255
    pred = rng.integers(0, 5, (2, 6, 7))
    pred[rng.random(pred.shape) < 0.2] = 255  # void predictions: the extra last column
    expected = np.zeros((5, 6), np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g != 255:
            expected[g, min(p, 5)] += 1
    conf = carb.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8), 5)
    np.testing.assert_array_equal(conf.numpy(), expected)


def test_void_prediction_is_a_miss_and_no_false_positive():
    # GT road road car car, prediction road void void car: road tp 1, fn 1; car tp 1, fn 1; nobody gets an fp
    conf = carb.confusion_matrix(torch.tensor([0, 255, 255, 13]), torch.tensor([0, 0, 13, 13], dtype=torch.uint8), C)
    assert conf.shape == (C, C + 1) and conf[:, C].sum() == 2
    iou = carb.iou_from_confusion(conf)
    assert iou[0].item() == 0.5 and iou[13].item() == 0.5
    assert iou.isnan().sum() == C - 2
    assert carb.mean_iou(iou) == 50.0


def test_train_to_label_and_image_id():
    known = {0: 7, 1: 8, 2: 11, 10: 23, 11: 24, 13: 26, 18: 33, 255: 0}  # from the Cityscapes label table; void -> 0
    for train_id, label_id in known.items():
        assert evaluation.TRAIN_TO_LABEL[train_id].item() == label_id
    assert carb.image_id("/d/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png") == \
        "frankfurt_000000_000294"
    assert carb.image_id("frames/dashcam 01.jpg") == "dashcam 01"


class FixedLogits(nn.Module):
    """A stand-in model: logits chosen by the input's height, whatever the pixels; it records the sizes it sees."""

    def __init__(self, by_height):
        super().__init__()
        self.by_height, self.seen = by_height, []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        logits = torch.tensor(self.by_height[x.shape[-2]], dtype=torch.float32)  # [C, 1, W]
        return F.interpolate(logits[None], size=x.shape[-2:], mode="nearest")


def test_predict_flip_sums_logits_as_carbs_aug_test():
    # one 1x2 image; logits (5, 0, 4) left and (0, 5, 4.5) right: class 0 left, 1 right. The mirrored view puts them
    # the other way round, so each pixel gets both. Summed logits (CARB's fork): (5, 5, 8.5) -> class 2. Averaged
    # softmax (mmseg's own) would give (0.365, 0.313, 0.322) -> class 0.
    model = FixedLogits({1: [[[5.0, 0.0]], [[0.0, 5.0]], [[4.0, 4.5]]]})
    images = torch.zeros(1, 3, 1, 2, dtype=torch.uint8)
    assert evaluation.predict_tta(model, images).tolist() == [[[0, 1]]]
    assert evaluation.predict_tta(model, images, flip=True).tolist() == [[[2, 2]]]
    assert model.seen == [(1, 2), (1, 2), (1, 2)]


def test_predict_scales_resize_and_sum_logits():
    # at full size the model says (5, 0, 4), at half size (0, 5, 4.5): summed (5, 5, 8.5) -> 2 (softmax: 0)
    model = FixedLogits({4: [[[5.0]], [[0.0]], [[4.0]]], 2: [[[0.0]], [[5.0]], [[4.5]]]})
    out = evaluation.predict_tta(model, torch.zeros(1, 3, 4, 6, dtype=torch.uint8), scales=(1.0, 0.5))
    assert model.seen == [(4, 6), (2, 3)]
    assert out.shape == (1, 4, 6) and (out == 2).all()


# the Cityscapes palette, from the dataset's documentation (not from carb.PALETTE)
ROAD, SKY, CAR, BUILDING, VOID = (128, 64, 128), (70, 130, 180), (0, 0, 142), (70, 70, 70), (0, 0, 0)


def test_vis_strip_layout_and_palette():
    image = torch.zeros(3, 32, 128, dtype=torch.uint8)
    image[0, :, :64] = 200  # left half red
    pred = torch.full((32, 128), 10)  # sky ...
    pred[16:] = 0  # ... over road
    pred[20:, 100:] = 255  # void corner
    gt = torch.full((32, 128), 13)  # car
    strip = evaluation.vis_strip(image, {"prediction": pred, "GT": gt})
    # 3 panels of 128, a 16 px title band, 32 px of panels, one 16 px legend row (3 classes, 3 entries per row)
    assert strip.size == (3 * 128, 16 + 32 + 16)
    px = lambda x, y: strip.getpixel((x, y))  # noqa: E731
    assert px(10, 16 + 5) == (200, 0, 0) and px(100, 16 + 5) == (0, 0, 0)  # the image
    assert px(128 + 5, 16 + 2) == SKY and px(128 + 5, 16 + 30) == ROAD and px(128 + 120, 16 + 30) == VOID
    assert px(256 + 64, 16 + 16) == CAR
    assert px(128 + 120, 8) == (255, 255, 255)  # title band, away from the text
    # legend, in trainId order: road (0), sky (10), car (13); swatch centres at x = 112 n + 8
    assert [px(112 * n + 8, 16 + 32 + 8) for n in range(3)] == [ROAD, SKY, CAR]


def test_vis_strip_shrinks_wide_images():
    strip = evaluation.vis_strip(torch.zeros(3, 8, 2048, dtype=torch.uint8), {"GT": torch.full((8, 2048), 2)})
    assert strip.size == (2 * 1024, 16 + 4 + 16)
    assert strip.getpixel((1024 + 500, 16 + 2)) == BUILDING


# ---------------------------------------------------------------------------------------------------
# 7. main / CLI, end to end on the tiny tree with the tiny CLIP
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_clip_path):
    """One 4-iteration run (CARB from iteration 2); afterwards gtFine/train is removed, so every later run
    proves that training takes nothing from the train GT beyond the cached image-level labels."""
    base = tmp_path_factory.mktemp("e2e")
    root = write_tree(base / "cityscapes")
    home = base / "home"
    home.mkdir()

    def argv(out, iters, *extra):
        return ["--data", "cityscapes", "--data-root", root, "--out", out, "--iters", iters, "--batch-size", 2,
                "--crop", 32, 64, "--window", 32, 16, "--carb-start", 2, "--val-every", 2, "--workers", 0,
                "--backbone", "mobilenet_v3_large", "--backbone-weights", "none", "--clip-model", tiny_clip_path,
                "--cache-dir", base / "cache", "--device", "cpu", *extra]

    def train(out, iters, *extra):
        return cli("carb.py", *argv(out, iters, *extra), home=home)

    first = train(base / "run", 4)
    shutil.rmtree(root / "gtFine" / "train")
    return dict(base=base, root=root, home=home, run=base / "run", first=first, train=train, argv=argv,
                clip=tiny_clip_path)


def test_train_cli_prints_both_mious_and_saves_checkpoint(trained):
    r = trained["first"]
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("pseudo-mask", "model"):
        found = re.findall(rf"^{name} mIoU: (\S+)$", r.stdout, re.M)
        assert len(found) == 1, r.stdout
        assert 0 <= float(found[0]) <= 100
    ckpt = torch.load(trained["run"] / "last.pth", weights_only=True)
    assert ckpt["iteration"] == 4
    assert "text_classifier" in ckpt["model"] and ckpt["model"]["text_classifier"].shape == (C, 32)
    assert len(ckpt["balancer"]["consistent"]) == 2  # CARB ran at iterations 2 and 3


def test_training_draws_no_pictures_eval_vis_does(trained):
    # carb.py trains and prints; pictures are eval.py --vis's (image | CLIP pseudo-mask | model | GT)
    assert sorted(os.listdir(trained["run"])) == ["best.pth", "last.pth", "log.csv"]


def test_carb_prints_what_eval_prints_for_last_pth_and_the_command_that_prints_it(trained):
    r = trained["first"]
    command = re.findall(r"^per-class table: (.+)$", r.stdout, re.M)
    assert len(command) == 1 and r.stdout.rstrip().endswith(command[0]), r.stdout  # the run's last line
    argv = shlex.split(command[0])
    assert argv[:2] == ["python", "eval.py"] and argv[argv.index("--ckpt") + 1] == str(trained["run"] / "last.pth")
    e = cli(*argv[1:], "--data", "cityscapes", "--device", "cpu", "--workers", 0, home=trained["home"])
    assert e.returncode == 0, e.stderr[-3000:]
    for name in ("pseudo-mask", "model"):  # the same weights, val split and device: the same numbers
        printed = re.findall(rf"^{name} mIoU: (\S+)$", r.stdout, re.M)
        assert printed == re.findall(rf"^{name} mIoU: (\S+)$", e.stdout, re.M) and len(printed) == 1, (r.stdout,
                                                                                                    e.stdout)


def test_eval_cli(trained):
    r = cli("eval.py", "--data", "cityscapes", "--data-root", trained["root"], "--ckpt", trained["run"] / "last.pth",
            "--device", "cpu", "--workers", 0, home=trained["home"])
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.findall(r"^model mIoU: (\S+)$", r.stdout, re.M)
    assert len(found) == 1 and 0 <= float(found[0]) <= 100
    assert re.search(r"^model pixel accuracy: \S+$", r.stdout, re.M)
    cells = model_column(r.stdout)
    assert statistics.mean(float(v) for v in cells.values()) == pytest.approx(float(found[0]), abs=0.01)


def model_column(stdout):
    """{class: the model column's cell} of a printed IoU table, whose last column is the model's."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("class "))
    assert lines[header].split()[-1] == "model", lines[header]
    end = next(i for i in range(header, len(lines)) if lines[i].startswith("mIoU "))
    cells = {re.match(r"(.+?)\s{2,}", line).group(1): line.split()[-1] for line in lines[header + 1:end]}
    assert cells, stdout
    return {name: cell for name, cell in cells.items() if cell != "-"}


# ---------------------------------------------------------------------------------------------------
# eval.py's modes, in-process on tiny trees; numbers checked against the official Cityscapes evaluation
# ---------------------------------------------------------------------------------------------------

def run_eval(*args):
    return evaluation.main(evaluation.get_args_parser().parse_args([str(a) for a in args]))


def official_evaluation(pred_files, gt_files):
    """cityscapesScripts' own pixel-level evaluation (a test-only requirement) of labelId PNGs: {class: IoU}, mean.
    Its instance-level nIoU path is off: it needs *_instanceIds.png files and numpy's np.in1d (removed in 2.4)."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    args = copy.copy(official.args)
    args.evalInstLevelScore, args.evalPixelAccuracy, args.JSONOutput, args.quiet = False, False, False, True
    result = official.evaluateImgLists([str(p) for p in pred_files], [str(g) for g in gt_files], args)
    return result["classScores"], result["averageScoreClasses"]


def assert_same_as_official(ours, scores, mean):
    for name in carb.CLASS_NAMES:
        if math.isnan(scores[name]):
            assert ours["classes"][name]["iou"] is None, name
        else:
            assert ours["classes"][name]["iou"] == pytest.approx(100 * scores[name], abs=1e-9), name
    assert ours["miou"] == pytest.approx(100 * mean, abs=1e-9)


# labelIds of the GT and of the predictions; 0, 1, 4, 5, 9 are ignored in evaluation
GT_IDS, PRED_IDS = [7, 8, 11, 23, 26, 0, 1, 4, 9], [7, 8, 11, 23, 24, 0, 5, 9]  # car never predicted, person never GT
TO_TRAIN = {7: 0, 8: 1, 11: 2, 23: 10, 24: 11, 26: 13}  # labelId -> trainId, from the Cityscapes table; others void


@pytest.fixture
def labelled(tmp_path):
    """A val split of 3 images (32x64) and labelId predictions pred/pred_city_000000_00000N.png."""
    rng = np.random.default_rng(0)
    root, pred = tmp_path / "cs", tmp_path / "pred"
    for folder in (root / "leftImg8bit" / "val" / "city", root / "gtFine" / "val" / "city", pred):
        folder.mkdir(parents=True)
    gts, preds = [], []
    for n in range(3):
        gt = rng.choice(GT_IDS, (32, 64)).astype(np.uint8)
        p = np.where(rng.random((32, 64)) < 0.6, gt, rng.choice(PRED_IDS, (32, 64))).astype(np.uint8)
        p[(p == 26) | (p == 1)] = 7
        p[p == 4] = 0
        Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(
            root / "leftImg8bit" / "val" / "city" / f"city_000000_00000{n}_leftImg8bit.png")
        gts.append(root / "gtFine" / "val" / "city" / f"city_000000_00000{n}_gtFine_labelIds.png")
        preds.append(pred / f"pred_city_000000_00000{n}.png")
        Image.fromarray(gt).save(gts[-1])
        Image.fromarray(p).save(preds[-1])
    return dict(root=root, pred=pred, gts=gts, preds=preds, tmp=tmp_path)


def test_pred_dir_agrees_with_official_cityscapes_evaluation(labelled, capsys):
    out = labelled["tmp"] / "result.json"
    results = run_eval("--data", "cityscapes", "--data-root", labelled["root"], "--pred-dir", labelled["pred"],
                       "--pred-format", "labelid", "--json", out, "--workers", 0)
    ours = json.load(open(out))["results"]["predictions"]
    assert ours == results["predictions"]
    scores, mean = official_evaluation(labelled["preds"], labelled["gts"])
    assert_same_as_official(ours, scores, mean)
    classes = ours["classes"]
    assert classes["person"]["iou"] == 0.0 and classes["car"]["iou"] == 0.0  # predicted only / GT only: 0, counted
    assert classes["wall"]["iou"] is None  # in neither: left out of the mean
    ious = [c["iou"] for c in classes.values() if c["iou"] is not None]
    assert len(ious) == 6 and ours["miou"] == pytest.approx(sum(ious) / 6)
    # counts and pixel accuracy by numpy, over the GT pixels of evaluated classes
    gt = np.stack([np.array(Image.open(p)) for p in labelled["gts"]])
    pred = np.stack([np.array(Image.open(p)) for p in labelled["preds"]])
    scored = np.isin(gt, list(TO_TRAIN))
    assert ours["labelled_pixels"] == scored.sum()
    assert ours["pixel_accuracy"] == pytest.approx(100 * (scored & (pred == gt)).sum() / scored.sum())
    assert classes["road"]["gt_pixels"] == (gt == 7).sum()
    assert classes["road"]["predicted_pixels"] == (scored & (pred == 7)).sum()
    assert classes["road"]["true_positives"] == ((gt == 7) & (pred == 7)).sum()
    printed = capsys.readouterr().out
    assert re.search(rf"^predictions mIoU: {ours['miou']:.2f}$", printed, re.M)
    assert re.search(r"^person\s+0\.00$", printed, re.M) and not re.search(r"^wall", printed, re.M)


def test_pred_dir_trainids_with_void_score_the_same(labelled):
    # the same predictions as trainIds: ignored labelIds become void (255), which must still count as misses
    trainid_dir = labelled["tmp"] / "trainids"
    trainid_dir.mkdir()
    lut = np.full(256, 255, np.uint8)
    lut[list(TO_TRAIN)] = list(TO_TRAIN.values())
    for p in labelled["preds"]:
        Image.fromarray(lut[np.array(Image.open(p))]).save(trainid_dir / p.name)
    ours = run_eval("--data", "cityscapes", "--data-root", labelled["root"], "--pred-dir", trainid_dir,
                    "--pred-format", "trainid", "--workers", 0)["predictions"]
    assert_same_as_official(ours, *official_evaluation(labelled["preds"], labelled["gts"]))


@pytest.mark.parametrize("case, message", [
    ("missing", "1 of 3 images of --split val have no prediction in .* \\(first: city_000000_000001\\)"),
    ("extra", "1 PNG\\(s\\) in .* are for no image .*first: .*notes.png"),
    ("doubled", "two predictions for city_000000_000000"),
    ("size", "pred_city_000000_000002.png is 16x64 but its image is 32x64"),
    ("range", "pred_city_000000_000002.png holds 40, not a labelid .*--pred-format trainid"),
    ("colour", "pred_city_000000_000002.png has 3 channels"),
])
def test_pred_dir_bad_input_names_the_culprit(labelled, case, message):
    pred, last = labelled["pred"], labelled["preds"][2]
    if case == "missing":
        os.remove(labelled["preds"][1])
    elif case == "extra":
        Image.new("L", (64, 32)).save(pred / "notes.png")
    elif case == "doubled":
        (pred / "sub").mkdir()
        shutil.copy(labelled["preds"][0], pred / "sub" / "city_000000_000000_color.png")
    elif case == "size":
        Image.new("L", (64, 16), 7).save(last)
    elif case == "range":
        Image.new("L", (64, 32), 40).save(last)
    else:
        Image.new("RGB", (64, 32)).save(last)
    with pytest.raises(carb.CarbError, match=message):
        run_eval("--data", "cityscapes", "--data-root", labelled["root"], "--pred-dir", pred, "--workers", 0)


def test_pred_dir_error_is_one_line_exit_2(labelled, tmp_path):
    os.remove(labelled["preds"][0])
    line = eval_cli_one_line_error(tmp_path, "--data", "cityscapes", "--data-root", labelled["root"], "--pred-dir",
                                   labelled["pred"], culprits=["city_000000_000000"])
    assert line.startswith("eval.py: error: --pred-dir: 1 of 3 images")


def test_ckpt_and_saved_labelids_agree_with_official_evaluation(trained, tmp_path):
    root, ckpt = trained["root"], trained["run"] / "last.pth"
    single = run_eval("--data", "cityscapes", "--data-root", root, "--ckpt", ckpt, "--workers", 0,
                      "--save-dir", tmp_path / "single")
    gts = sorted((root / "gtFine" / "val" / "city").glob("*_labelIds.png"))
    saved = sorted((tmp_path / "single").iterdir())
    assert [p.name for p in saved] == ["x_000000_000000_labelIds.png", "x_000000_000001_labelIds.png"]
    assert list(single) == ["model"]
    assert_same_as_official(single["model"], *official_evaluation(saved, gts))
    # test-time augmentation: a second column; the single-scale one is unchanged, the saved files are the TTA ones
    tta = run_eval("--data", "cityscapes", "--data-root", root, "--ckpt", ckpt, "--workers", 0, "--flip",
                   "--scales", 0.5, 1.0, "--save-dir", tmp_path / "tta")
    assert list(tta) == ["model", "model TTA"] and tta["model"] == single["model"]
    assert_same_as_official(tta["model TTA"], *official_evaluation(sorted((tmp_path / "tta").iterdir()), gts))


def test_test_split_export_is_what_the_server_takes(trained, tmp_path, capsys):
    root = tmp_path / "cs"
    test_dir = root / "leftImg8bit" / "test" / "berlin"
    test_dir.mkdir(parents=True)
    for name in ("berlin_000000_000019", "berlin_000123_000019"):  # no gtFine/test at all
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(test_dir / f"{name}_leftImg8bit.png")
    out = tmp_path / "submit"
    assert run_eval("--data", "cityscapes", "--data-root", root, "--split", "test", "--ckpt",
                    trained["run"] / "last.pth", "--save-dir", out, "--workers", 0) is None
    assert sorted(os.listdir(out)) == ["berlin_000000_000019_labelIds.png", "berlin_000123_000019_labelIds.png"]
    eval_label_ids = {c.id for c in carb.CITYSCAPES}
    for name in os.listdir(out):
        png = Image.open(out / name)
        assert png.mode == "L" and png.size == (48, 32)
        assert set(np.unique(np.array(png)).tolist()) <= eval_label_ids
    assert "mIoU" not in capsys.readouterr().out


def test_images_folder_gives_trainids_and_colors(trained, tmp_path, capsys):
    frames, out = tmp_path / "frames", tmp_path / "out"
    frames.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)).save(frames / "cam_a.jpg")
    Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(frames / "cam_b.png")
    (frames / "readme.txt").write_text("not an image")
    run_eval("--images", frames, "--ckpt", trained["run"] / "last.pth", "--save-dir", out, "--workers", 0)
    assert sorted(os.listdir(out)) == ["cam_a_color.png", "cam_a_trainIds.png", "cam_b_color.png",
                                       "cam_b_trainIds.png"]
    palette = {c.train_id: c.color for c in torchvision.datasets.Cityscapes.classes}
    for stem, size in (("cam_a", (40, 72)), ("cam_b", (32, 64))):
        ids, color = np.array(Image.open(out / f"{stem}_trainIds.png")), np.array(Image.open(out / f"{stem}_color.png"))
        assert ids.shape == size and color.shape == (*size, 3) and ids.max() < C
        for y, x in [(0, 0), (size[0] - 1, size[1] - 1), (10, 20)]:
            assert tuple(color[y, x]) == palette[ids[y, x]]
    assert "images: 100%" in capsys.readouterr().err  # the progress bar


def test_clip_view_tiles_and_scale():
    # a fake scorer: call k scores class k everywhere; it records its input sizes
    seen = []

    def scorer(x):
        seen.append(tuple(x.shape[-2:]))
        scores = torch.zeros(1, 4, x.shape[-2] // 16, x.shape[-1] // 16)
        scores[:, len(seen) - 1] = 1
        return scores

    image = torch.zeros(3, 32, 64, dtype=torch.uint8)
    mask = evaluation.clip_view(scorer, image, torch.tensor([1.0, 1.0, 0.0, 1.0]), 2.0, 2)
    assert seen == [(32, 64)] * 4  # four 16x32 tiles, each up-scaled x2
    # tiles in row order get classes 0, 1, 2, 3; class 2 is not a label of the image, so the first label (0) wins
    assert (mask[:16, :32] == 0).all() and (mask[:16, 32:] == 1).all()
    assert (mask[16:, :32] == 0).all() and (mask[16:, 32:] == 3).all()


def test_premise_flag_runs_on_a_checkpoint(trained, tmp_path, capsys):
    results = run_eval("--data", "cityscapes", "--data-root", trained["root"], "--ckpt", trained["run"] / "last.pth",
                       "--premise", "--cache-dir", tmp_path / "cache", "--workers", 0)
    figures = results["premise"]
    assert figures["R_c share"] + figures["R_i share"] == pytest.approx(100)
    assert "a fresh RegionBalancer's w" in capsys.readouterr().out


def test_clip_mode_reports_original_and_fig3_view(trained, tmp_path, monkeypatch):
    root = trained["root"]
    results = run_eval("--data", "cityscapes", "--data-root", root, "--clip", "--clip-scale", 2, "--clip-tiles", 2,
                       "--clip-model", trained["clip"],
                       "--cache-dir", tmp_path / "cache", "--workers", 0)
    assert list(results) == ["pseudo-mask", "pseudo-mask x2 2x2"]
    # the original view, by carb.validate (the route of carb.py's printed pseudo-mask mIoU)
    scorer, _ = carb.build_scorer(argparse.Namespace(data="cityscapes", clip_model=str(trained["clip"]),
                                                     dense_clip="maskclip", cache_dir=str(tmp_path / "c2")),
                                  torch.device("cpu"))
    loader = torch.utils.data.DataLoader(carb.EvalSet(*carb.list_split(str(root), "val")), batch_size=1)
    expected = carb.mean_iou(carb.validate(nn.Conv2d(3, C, 1), loader, scorer)["pseudo-mask"])
    assert results["pseudo-mask"]["miou"] == pytest.approx(expected)

    # Both columns by hand, with a CLIP that says sky (10) where what it sees is mostly white, else road (0), and
    # val images white in rows 0-24 of 64, black below. GT (VAL_LABELS): image 0 sky 0-16, building 16-32,
    # road 32-56, car 56-64; image 1 sky 0-24, road 24-64 (rows of 128 pixels; counts below in rows).
    tree = write_tree(tmp_path / "white_top")
    for n in (0, 1):
        image = np.zeros((64, 128, 3), np.uint8)
        image[:24] = 255
        Image.fromarray(image).save(tree / "leftImg8bit" / "val" / "city" / f"x_000000_00000{n}_leftImg8bit.png")
    mean, std = (torch.tensor(v)[:, None, None] for v in (carb.CLIP_MEAN, carb.CLIP_STD))

    sizes = []

    def white_is_sky(x):  # CLIP-normalized [B,3,H,W] -> one-hot scores on the 16x16 patch grid
        sizes.append(tuple(x.shape[-2:]))
        scores = torch.zeros(x.shape[0], C, x.shape[-2] // 16, x.shape[-1] // 16)
        for b in range(x.shape[0]):
            scores[b, 10 if (x[b] * std + mean).mean() > 0.5 else 0] = 1
        return scores

    monkeypatch.setattr(carb, "build_scorer", lambda args, device: (white_is_sky, torch.eye(C)))
    results = run_eval("--data", "cityscapes", "--data-root", tree, "--clip", "--clip-scale", 2, "--clip-tiles", 2,
                       "--workers", 0)
    assert sizes == [(64, 128)] * 10  # per image: the whole image, then its four 32x64 quarters up-scaled x2
    # original: the whole image is 24/64 white -> road everywhere. road tp 24 + 40, predicted 128, GT 64: 1/2;
    # sky, building, car: GT only, 0. mIoU (0.5 + 0 + 0 + 0) / 4
    # x2 2x2: the top tiles (rows 0-32) are 24/32 white -> sky, the bottom ones black -> road.
    #   sky: tp 16 + 24, predicted 64, GT 40 -> 40/64; road: tp 24 + 32, predicted 64, GT 64 -> 56/72
    by_hand = {"pseudo-mask": {"road": 0.5, "sky": 0.0, "building": 0.0, "car": 0.0},
               "pseudo-mask x2 2x2": {"road": 56 / 72, "sky": 40 / 64, "building": 0.0, "car": 0.0}}
    assert list(results) == list(by_hand)
    for title, ious in by_hand.items():
        got = {name: c["iou"] for name, c in results[title]["classes"].items() if c["iou"] is not None}
        assert got == pytest.approx({name: 100 * v for name, v in ious.items()}), title
        assert results[title]["miou"] == pytest.approx(100 * sum(ious.values()) / 4), title
    assert results["pseudo-mask"]["miou"] == pytest.approx(12.5)
    # carb.validate (carb.py's printed pseudo-mask mIoU) gives the same original-view number
    loader = torch.utils.data.DataLoader(carb.EvalSet(*carb.list_split(str(tree), "val")), batch_size=1)
    assert carb.mean_iou(carb.validate(nn.Conv2d(3, C, 1), loader, white_is_sky)["pseudo-mask"]) == pytest.approx(12.5)


def test_vis_writes_one_strip_per_image(trained, tmp_path):
    run_eval("--data", "cityscapes", "--data-root", trained["root"], "--ckpt", trained["run"] / "last.pth",
             "--vis", tmp_path / "vis", "--cache-dir", tmp_path / "cache", "--workers", 0)
    assert sorted(os.listdir(tmp_path / "vis")) == ["x_000000_000000.png", "x_000000_000001.png"]
    strip = Image.open(tmp_path / "vis" / "x_000000_000000.png").convert("RGB")
    assert strip.width == 4 * 128  # image | pseudo-mask | model | GT
    assert strip.getpixel((3 * 128 + 5, 16 + 20)) == BUILDING and strip.getpixel((3 * 128 + 5, 16 + 40)) == ROAD


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_resume_without_checkpoint_is_a_one_line_error(trained):
    empty = trained["base"] / "empty"
    empty.mkdir()
    r = trained["train"](empty, 4, "--resume")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("carb.py: error: --resume"), r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == lines[0]


def test_missing_data_root_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere"
    r = cli("carb.py", "--data", "cityscapes", "--data-root", missing, "--out", tmp_path / "run",
            "--cache-dir", tmp_path / "cache", "--device", "cpu", home=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("carb.py: error:") and "--data-root" in lines[0] and str(missing) in lines[0]
    assert not (tmp_path / "run").exists()


def test_val_is_scored_on_last_pth_as_the_official_test_script():
    """best.pth is picked by val mIoU, so scoring it on val is optimistic; official tools/test.sh scores latest.pth."""
    for name in ("README.md", "eval.py"):
        text = open(os.path.join(REPO, name)).read()
        commands = [line for line in text.splitlines() if "--ckpt" in line and "python eval.py" in line]
        assert commands and all("best.pth" not in line for line in commands), name
    help_text = carb.get_args_parser().format_help()
    assert "best.pth (the best val mIoU" in help_text and "optimistic" in help_text


def test_import_has_no_side_effects(tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, HOME=str(home), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", "import carb"], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert os.listdir(cwd) == [] and os.listdir(home) == []


def test_readme_loss_block_is_carb_section_4_and_the_objective():
    """The README's copy-paste block is section 4 of carb.py, character for character, then the whole objective in a
    few lines; it runs on torch alone and gives the CEs and the loss worked by hand."""
    readme = open(os.path.join(REPO, "README.md")).read()
    start = readme.index("```python\n", readme.index("## The loss, for copy-paste")) + len("```python\n")
    block = readme[start:readme.index("```", start)]
    source = open(os.path.join(REPO, "carb.py")).read()
    section = source[source.index("def masked_cross_entropy("):source.index("\n# 5. One training step")]
    assert block.startswith("import torch\n\n\n" + section.rstrip() + "\n\n\n"), "README block != carb.py section 4"
    objective = block[len("import torch\n\n\n" + section.rstrip() + "\n\n\n"):]
    assert len(objective.strip().splitlines()) <= 6 and "w * ce_i" in objective, objective
    namespace = {}
    exec(block, namespace)  # only `import torch` is available to it
    logits, mask, labels = carb_inputs()
    local_logits, local_mask = logits[..., 3:], mask[..., 3:]  # a "window": columns 3 and 4, both inconsistent
    balancer = namespace["RegionBalancer"]()
    loss = namespace["carb_objective"](logits, mask, local_logits, local_mask, labels, balancer)
    w = CE_C / CE_I  # a fresh balancer: this step's CEs alone
    assert balancer.consistent == pytest.approx([CE_C], rel=1e-5) and len(balancer.inconsistent) == 1
    assert loss.item() == pytest.approx(CE_C + w * CE_I + w * CE_I, rel=1e-5)  # the window: CE(R_i^local) only


# ---------------------------------------------------------------------------------------------------
# Reliability: interruption, exact resume, checkpoints that stay whole, one-line errors that damage nothing
# ---------------------------------------------------------------------------------------------------

def snapshot(*roots):
    """{path: bytes} of every file under `roots` (files or folders): what a failed run must leave as it was."""
    found = {}
    for root in map(pathlib.Path, roots):
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file():
                found[str(p)] = p.read_bytes()
    return found


def run_carb(capsys, *args):
    """carb.run in this process (no interpreter start-up): (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        carb.run([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def assert_one_line_error(code, stderr, *culprits, prog="carb.py"):
    """Exit 2, no traceback, exactly one error line, last on stderr (progress bars aside), naming the culprits."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for culprit in culprits:
        assert str(culprit) in errors[0], (culprit, errors[0])


def eval_cli_one_line_error(home, *argv, culprits=()):
    """eval.py on the command line: exit 2, and its stderr is the one error line, naming the culprits; returns it."""
    r = cli("eval.py", *argv, home=home)
    assert_one_line_error(r.returncode, r.stderr, *culprits, prog="eval.py")
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr  # not even a progress bar before it
    return r.stderr.strip()


def small_argv(tree, tmp_path, *extra):
    """A 2-iteration run on a tiny tree with the simulated CLIP (nothing to load; it needs 3 x 3 patches)."""
    return ["--data", "cityscapes", "--data-root", tree, "--out", tmp_path / "run", "--iters", 2, "--batch-size", 2,
            "--crop", 64, 128, "--window", 48, 48, "--carb-start", 1, "--val-every", 2, "--workers", 0,
            "--backbone", "mobilenet_v3_large", "--backbone-weights", "none", "--clip-model", "simulated",
            "--cache-dir", tmp_path / "cache", "--device", "cpu", *extra]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def no_layout(tree):
    shutil.rmtree(tree / "leftImg8bit")
    return [tree / "leftImg8bit" / "train", "--data-root"]


def empty_split(tree):
    for p in (tree / "leftImg8bit" / "train" / "city").iterdir():
        p.unlink()
    return [tree / "leftImg8bit" / "train", "no"]


def missing_labels(tree):
    shutil.rmtree(tree / "gtFine" / "val")
    return ["2 label files", tree / "gtFine" / "val" / "city" / "x_000000_000000_gtFine_labelIds.png"]


def truncated_label(tree):
    path = tree / "gtFine" / "train" / "city" / "x_000000_000001_gtFine_labelIds.png"
    truncate(path)
    return [path, "truncated"]


def unreadable_image(tree):
    path = tree / "leftImg8bit" / "val" / "city" / "x_000000_000001_leftImg8bit.png"
    path.write_bytes(b"not a png")
    return [path]


def wrong_size_label(tree):
    path = tree / "gtFine" / "val" / "city" / "x_000000_000001_gtFine_labelIds.png"
    Image.fromarray(np.full((32, 64), 7, np.uint8)).save(path)
    return [path, "(32, 64)", "(64, 128)"]


def not_label_ids(tree):
    path = tree / "gtFine" / "train" / "city" / "x_000000_000000_gtFine_labelIds.png"
    label = np.array(Image.open(path))
    label[0, :3] = 40  # not a Cityscapes labelId (0-33)
    Image.fromarray(label).save(path)
    return [path, "40", "labelIds"]


@pytest.mark.parametrize("damage", [no_layout, empty_split, missing_labels, truncated_label, unreadable_image,
                                    wrong_size_label, not_label_ids])
def test_bad_data_is_a_one_line_error_naming_the_file(damage, tmp_path, capsys):
    tree = write_tree(tmp_path / "cityscapes")
    culprits = damage(tree)
    before = snapshot(tree)
    code, err = run_carb(capsys, *small_argv(tree, tmp_path))
    assert_one_line_error(code, err, *culprits)
    assert snapshot(tree) == before and not (tmp_path / "run").exists()


def test_truncated_image_in_a_dataloader_worker_is_a_one_line_error(tmp_path):
    """Found only when decoded, inside a worker process: still one line naming the file, no traceback."""
    tree = write_tree(tmp_path / "cityscapes")
    path = tree / "leftImg8bit" / "train" / "city" / "x_000000_000001_leftImg8bit.png"
    truncate(path)
    before = snapshot(tree)
    r = cli("carb.py", *small_argv(tree, tmp_path, "--workers", 1), home=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, path, "truncated")
    assert snapshot(tree) == before and not (tmp_path / "run" / "last.pth").exists()


@pytest.mark.parametrize("extra, culprit", [
    (["--iters", 0], "--iters: 0 must be at least 1"),
    (["--batch-size", -2], "--batch-size: -2 must be at least 1"),
    (["--workers", -1], "--workers: -1 must be at least 0"),
    (["--carb-start", 3], "--carb-start 2"),  # beyond --iters 2: the message says how to switch CARB off
    (["--crop", 512, 1024, "--scale-range", 0.25, 0.25], "--crop 512 1024"),  # 0.25 x 1024x2048 is 256x512
    (["--scale-range", 2, 1], "--scale-range"),
])
def test_nonsensical_numbers_are_one_line_errors(extra, culprit, tree, tmp_path, capsys):
    code, err = run_carb(capsys, *small_argv(tree, tmp_path, *extra))
    assert_one_line_error(code, err, culprit)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [["--carb-start", 2], ["--carb-start", 0, "--region-weight", 0.03,
                                                          "--no-local-view"]])
def test_carb_start_at_iters_trains_without_carb_and_logs_every_iteration(extra, tree, tmp_path, capsys):
    """--carb-start 2 of 2: plain CE throughout. --carb-start 0 with a fixed --region-weight: CARB at every row, w
    exactly that number, no balancer saved; with --no-local-view, no local loss. The lr column is the poly schedule."""
    carb.run([str(a) for a in small_argv(tree, tmp_path, "--lr", 0.004, "--min-lr", 0.0004, *extra)])
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["iteration"] for r in rows] == ["0", "1"]
    # poly: (0.004 - 0.0004) * (1 - it/2)^0.9 + 0.0004, worked by hand: 0.004 at 0; 0.0036 * 0.5^0.9 + 0.0004 at 1
    assert float(rows[0]["lr"]) == pytest.approx(0.004, rel=1e-12)
    assert float(rows[1]["lr"]) == pytest.approx(0.0036 * 0.5 ** 0.9 + 0.0004, rel=1e-12)
    carb_on = "--region-weight" in extra
    for r in rows:
        assert float(r["global"]) > 0
        assert float(r["consistent"]) + float(r["inconsistent"]) == pytest.approx(1)
        if carb_on:
            assert float(r["w"]) == 0.03 and float(r["ce_c"]) > 0 and float(r["ce_i"]) >= 0
            assert r["local"] == ""  # --no-local-view
        else:
            assert r["w"] == "" and float(r["ce_c"]) > 0 and float(r["ce_i"]) >= 0  # plain CE; the regions' CEs
            assert float(r["local"]) > 0                                              # are logged throughout
    assert rows[0]["val_miou"] == "" and 0 <= float(rows[1]["val_miou"]) <= 100
    ckpt = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert (ckpt["balancer"] is None) == carb_on  # a fixed weight has no history; the adaptive one is saved


def test_out_that_is_a_file_is_a_one_line_error(tree, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    argv = small_argv(tree, tmp_path)
    argv[argv.index("--out") + 1] = out
    code, err = run_carb(capsys, *argv)
    assert_one_line_error(code, err, "--out", out)
    assert out.read_text() == "my notes"


def test_new_run_into_a_finished_run_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    before = snapshot(out)
    code, err = run_carb(capsys, *trained["argv"](out, 4))
    assert_one_line_error(code, err, out, "--resume")
    assert snapshot(out) == before


@pytest.mark.parametrize("flag, other, culprit", [("--backbone", "resnet50", "--backbone mobilenet_v3_large"),
                                                   ("--data", "wilddash2", "--data cityscapes")])
def test_resume_with_another_backbone_or_data_is_a_one_line_error(flag, other, culprit, trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    before = snapshot(out)
    argv = trained["argv"](out, 6, "--resume")
    argv[argv.index(flag) + 1] = other
    code, err = run_carb(capsys, *argv)
    assert_one_line_error(code, err, out / "last.pth", culprit, f"not {other}")
    assert snapshot(out) == before


class Evil:
    """Unpickling this creates a file: proof that a loader did unpickle it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_clip_model_offline_says_how_to_pass_a_local_file(monkeypatch):
    import urllib.error

    def offline(url, root):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(clip.clip, "_download", offline)
    with pytest.raises(carb.CarbError, match=r"--clip-model ViT-B/16: .*offline.*pass its path"):
        carb.load_clip("ViT-B/16", "cpu")


def test_clip_model_file_that_is_not_clip_is_named_and_not_unpickled(tmp_path):
    """A pickle that would run code when loaded: refused by weights_only, and its code never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    torch.save({"x": Evil(marker)}, path)
    with pytest.raises(carb.CarbError, match=re.escape(str(path))):
        carb.load_clip(str(path), "cpu")
    assert not marker.exists()


def segmenter_checkpoint(path, classes=C, backbone="mobilenet_v3_large", saved_as="mobilenet_v3_large"):
    """A checkpoint whose weights are a `backbone` Segmenter for `classes` classes, whose args say `saved_as`."""
    model = carb.Segmenter(backbone, torch.randn(classes, 32))
    torch.save({"model": model.state_dict(), "iteration": 1, "args": {"backbone": saved_as}}, path)
    return path


@pytest.mark.parametrize("kind", ["classes", "backbone", "pickle", "truncated", "missing"])
def test_eval_ckpt_that_does_not_fit_is_a_one_line_error(kind, tmp_path):
    ckpt = tmp_path / "last.pth"
    culprits = [ckpt]
    if kind == "classes":
        segmenter_checkpoint(ckpt, classes=5)
        culprits.append("[5, 32]")
    elif kind == "backbone":  # mobilenet weights, but the args say resnet50
        segmenter_checkpoint(ckpt, saved_as="resnet50")
        culprits.append("resnet50")
    elif kind == "pickle":
        torch.save({"model": Evil(tmp_path / "pwned"), "iteration": 1, "args": {}}, ckpt)
    elif kind == "truncated":
        truncate(segmenter_checkpoint(ckpt))
    before = snapshot(tmp_path)
    argv = ["--data", "cityscapes", "--data-root", tmp_path, "--ckpt", ckpt, "--device", "cpu"]
    if kind == "truncated":  # once through the command line: exit code and the one line
        eval_cli_one_line_error(tmp_path, *argv, culprits=["--ckpt", *culprits])
    else:
        eval_py = importlib.import_module("eval")
        with pytest.raises(carb.CarbError) as e:
            eval_py.main(eval_py.get_args_parser().parse_args([str(a) for a in argv]))
        assert all(str(c) in str(e.value) for c in ["--ckpt", *culprits]), str(e.value)
    assert snapshot(tmp_path) == before  # nothing created (no pwned marker), nothing changed


def test_damaged_cache_is_recomputed(tree, tmp_path):
    _, gts = carb.list_split(str(tree), "train")
    labels = carb.image_level_labels(gts, C, str(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache").iterdir()
    truncate(cache)
    assert torch.equal(carb.image_level_labels(gts, C, str(tmp_path / "cache")), labels)
    assert torch.equal(torch.load(cache, weights_only=True)["value"], labels)  # and rewritten whole


def test_full_disk_while_saving_keeps_the_previous_checkpoint(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    before = snapshot(out / "last.pth", out / "best.pth")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if getattr(f, "name", "").endswith("last.pth.tmp"):
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_carb(capsys, *trained["argv"](out, 6, "--resume"))
    assert_one_line_error(code, err, out / "last.pth", "No space left on device", "free disk space")
    assert snapshot(out / "last.pth", out / "best.pth") == before
    assert not list(out.glob("*.tmp"))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    before = snapshot(out / "last.pth", out / "best.pth")
    real_forward = carb.Segmenter.forward
    monkeypatch.setattr(carb.Segmenter, "forward", lambda self, x: real_forward(self, x) * float("nan"))
    code, err = run_carb(capsys, *trained["argv"](out, 6, "--resume"))  # found before backward: the weights are
    assert_one_line_error(code, err, "iteration 4: non-finite loss", "global nan", out / "last.pth")  # untouched
    assert snapshot(out / "last.pth", out / "best.pth") == before


def test_sigterm_then_resume_equals_the_uninterrupted_run(trained, tmp_path, capsys, monkeypatch):
    """A real SIGTERM during iteration 2 of 5 (sent from inside train_one_step, so always at the same point):
    exit 143, last.pth of iteration 3, and the printed resume command -- run with another --workers -- ends with
    the same log.csv (every loss, w, region fraction, val mIoU) and the same weights as the uninterrupted run."""
    def argv(out, *extra):
        return [str(a) for a in trained["argv"](out, 5, "--val-every", 2, *extra)]

    assert not (trained["root"] / "gtFine" / "train").exists()  # every run here trains without the train GT
    carb.run(argv(tmp_path / "straight"))
    capsys.readouterr()

    real_step, calls = carb.train_one_step, []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args)

    monkeypatch.setattr(carb, "train_one_step", interrupted_step)
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as e:
        carb.run(argv(out))
    assert e.value.code == 143
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM after iteration 3; saved {out / 'last.pth'}" in err
    assert torch.load(out / "last.pth", weights_only=True)["iteration"] == 3
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers are put back

    with open(out / "log.csv", "a") as f:  # rows past the checkpoint, as a SIGKILL could leave: dropped on resume
        f.write("3,0.1,9,9,9,9,9,0.5,0.5,\n4,0.1,9")
    command = shlex.split(re.search(r"to continue: (.*)", err).group(1))
    assert command[:2] == ["python", "carb.py"] and command[-1] == "--resume"
    carb.run(command[2:] + ["--workers", "1"])  # randomness is per (seed, iteration, sample): workers don't matter

    assert (out / "log.csv").read_text() == (tmp_path / "straight" / "log.csv").read_text()
    a = torch.load(out / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 5 and a["balancer"] == b["balancer"]
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in y)
    assert len(b["balancer"]["consistent"]) == 3  # CARB from iteration 2 (the fixture's --carb-start)

    # a finished run continues to more iterations: the balancer's history is restored, then grows
    carb.run(argv(out, "--iters", 6, "--resume"))
    c = torch.load(out / "last.pth", weights_only=True)
    assert c["iteration"] == 6
    assert c["balancer"]["consistent"][:3] == b["balancer"]["consistent"] and len(c["balancer"]["consistent"]) == 4
    log = (out / "log.csv").read_text().splitlines()
    assert log[:6] == (tmp_path / "straight" / "log.csv").read_text().splitlines() and log[6].startswith("5,")


def test_ctrl_c_saves_and_says_how_to_resume(trained, tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group, DataLoader worker included."""
    out = tmp_path / "run"
    argv = [str(a) for a in trained["argv"](out, 500, "--val-every", 500, "--workers", 1)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HOME=str(trained["home"]))
    p = subprocess.Popen([sys.executable, "carb.py", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "log.csv").exists() and len((out / "log.csv").read_text().splitlines()) >= 2):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    done = torch.load(out / "last.pth", weights_only=True)["iteration"]
    assert 1 <= done < 500
    assert len((out / "log.csv").read_text().splitlines()) == 1 + done  # header + one row per saved iteration
    assert f"stopped by SIGINT after iteration {done}; saved {out / 'last.pth'}" in err
    assert re.search(r"to continue: python carb.py .*--out " + re.escape(str(out)) + r" .*--resume$", err, re.M)


VARIANTS = ["oracle", "a", "b", "c", "d", "e"]  # the ablation's rows, in order, as their run folders name them


@pytest.mark.parametrize("given, iters, carb_start", [
    (["--data", "cityscapes", "--iters", 4, "--carb-start", 2], 4, 2),  # as given
    (["--data", "synthetic"], 260, 138),  # ABLATION_ITERS; CARB from its default 213/400 of it: 138
])
def test_ablation_runs_each_variant_through_the_normal_cli(given, iters, carb_start, tmp_path, capsys, monkeypatch):
    """Every variant (the oracle, (a)-(e)) with every seed is one carb.main() of the normal command line with the
    variant's flags; a fake main records them and returns IoUs made up here, whose mean ± std rows and paired
    differences from (a) are worked out by hand."""
    out = tmp_path / "abl"
    seen = {}

    def fake_main(args):
        variant, seed = os.path.basename(args.out).rsplit("_seed", 1)[0], args.seed
        assert (variant, seed) not in seen
        seen[variant, seed] = args
        i = VARIANTS.index(variant)
        model = torch.full((C,), (10 * (i + 1) + (i + 1) * seed + 0.3) / 100)
        model[[5, 6, 7]] = torch.tensor([0.2 + 0.01 * seed, 0.05 * (i + 1) + 0.02 * seed * i, 0.5 - 0.03 * seed])
        return {"pseudo-mask": torch.full((C,), 0.4321, dtype=torch.float64), "model": model}  # per-class IoUs

    monkeypatch.setattr(carb, "main", fake_main)
    argv = [str(a) for a in given + ["--out", out, "--device", "cpu"]]
    results = carb.run(argv, evaluation.ablation)  # as eval.py --ablation, with carb.py's flags
    assert sorted(seen) == sorted((v, s) for v in VARIANTS for s in (0, 1, 2))
    for (v, s), args in seen.items():
        assert args.out == os.path.join(f"{out}_ablation", f"{v}_seed{s}") and args.seed == s
        assert args.iters == iters and args.val_every == iters
        assert args.oracle == (v == "oracle")
        assert args.no_local_view == (v in ("oracle", "a", "c"))
        assert args.carb_start == (iters if v in ("oracle", "a", "b") else carb_start)
        assert args.region_weight == ("0.03" if v == "e" else "adaptive")
        assert args.data == given[1] and args.device == "cpu"
    printed = capsys.readouterr().out
    assert f"ablation: {given[1]}, {iters} iterations per run, CARB from {carb_start}; pseudo-mask mIoU 43.21" \
        in printed
    assert re.search(r"^ablation took \d+ min \d+ s \(18 runs\)$", printed, re.M)
    header = next(line for line in printed.splitlines() if "mIoU" in line and "IoU pole" in line)
    assert re.split(r"\s{2,}", header.strip()) == ["mIoU", "IoU pole", "IoU traffic light", "IoU traffic sign"]
    runs = {}  # by hand, per variant and seed: [mIoU = the mean of the 19 IoUs, pole, traffic light, traffic sign] %
    for i, v in enumerate(VARIANTS):
        for s in (0, 1, 2):
            small = [0.2 + 0.01 * s, 0.05 * (i + 1) + 0.02 * s * i, 0.5 - 0.03 * s]
            rest = (10 * (i + 1) + (i + 1) * s + 0.3) / 100
            runs[v, s] = [100 * (16 * rest + sum(small)) / 19] + [100 * x for x in small]
    lines = printed.splitlines()
    split = next(n for n, line in enumerate(lines) if line.startswith("minus (a), seed by seed"))
    for (name, v) in zip([name for _, name, _ in evaluation.ABLATION], VARIANTS):
        assert results[name, 0] == pytest.approx(runs[v, 0], abs=1e-4)
        absolute = [(statistics.mean(c), statistics.stdev(c)) for c in zip(*[runs[v, s] for s in (0, 1, 2)])]
        diffs = [[x - y for x, y in zip(runs[v, s], runs["a", s])] for s in (0, 1, 2)]  # paired: seed by seed
        paired = [(statistics.mean(c), statistics.stdev(c)) for c in zip(*diffs)]  # sample std, as torch
        for expected, table in [(absolute, lines[:split]), (paired, lines[split:])]:
            row = next(line for line in table if line.startswith(name))
            cells = [(float(m), float(sd)) for m, sd in re.findall(r"([-+]?\d+\.\d\d) ± (\d+\.\d\d)", row)]
            assert len(cells) == 4, row
            for (m, sd), (em, esd) in zip(cells, expected):
                assert m == pytest.approx(em, abs=0.005 + 1e-4) and sd == pytest.approx(esd, abs=0.005 + 1e-4), row
    assert re.fullmatch(r"\(a\) global mask \+ CE(\s+\+0\.00 ± 0\.00){4}", lines[split + 2])


def test_paired_differences_by_hand():
    results = {("x", 0): [3.0, 1.0], ("x", 1): [5.0, 1.0], ("x", 2): [10.0, 4.0],
               ("base", 0): [1.0, 2.0], ("base", 1): [2.0, 2.0], ("base", 2): [4.0, 2.0]}
    diffs = evaluation.paired(results, ["x", "base"], (0, 1, 2), "base")
    # x - base per seed: mIoU 2, 3, 6 -> mean 11/3, sample std sqrt(((2-11/3)^2 + (3-11/3)^2 + (6-11/3)^2) / 2)
    mean, std = diffs["x"]
    assert mean[0].item() == pytest.approx(11 / 3) and std[0].item() == pytest.approx(math.sqrt((25 + 4 + 49) / 18))
    assert mean[1].item() == pytest.approx(0.0) and std[1].item() == pytest.approx(math.sqrt(3))  # -1, -1, 2
    assert diffs["base"][0].tolist() == [0.0, 0.0] and diffs["base"][1].tolist() == [0.0, 0.0]
    # unpaired, the seed-to-seed spread of x (std 3.6) would hide a difference its pairing shows (std 2.1)
    assert std[0].item() < statistics.stdev([3.0, 5.0, 10.0])


# ---------------------------------------------------------------------------------------------------
# Datasets beyond Cityscapes (CamVid, WildDash2) and training from image-level tags alone (--image-labels)
# ---------------------------------------------------------------------------------------------------

# The class tables as the issue and the official CARB code list them: names, and colours from their sources
# (CamVid: the SegNet palette; WildDash2: the categories of its panoptic.json), not from carb.DATASETS.
CAMVID = ["Sky", "Building", "Pole", "Road", "Sidewalk", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist"]
WILDDASH2 = ["ego vehicle", "road", "sidewalk", "building", "wall", "fence", "guard rail", "pole", "traffic light",
             "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "motorcycle",
             "bicycle", "pickup", "van", "billboard", "streetlight", "road marking"]
COLOURS = {"camvid": {0: (128, 128, 128), 3: (128, 64, 128), 8: (64, 0, 128), 10: (0, 128, 192)},
           "wilddash2": {0: (0, 20, 50), 1: (128, 64, 128), 20: (40, 0, 100), 24: (196, 176, 128)}}
LAYOUT = {"camvid": (".png", ".png"), "wilddash2": (".jpg", "_labelTrainIds.png")}  # image, label file endings
# Each image's class-index rows (255 = ignore); valid for both datasets.
FLAT_TRAIN = [((0, slice(0, 20)), (1, slice(20, 40)), (3, slice(40, 64))),
              ((255, slice(0, 10)), (3, slice(10, 50)), (8, slice(50, 64)))]
FLAT_VAL = [((0, slice(0, 16)), (1, slice(16, 32)), (3, slice(32, 56)), (8, slice(56, 64))),
            ((0, slice(0, 24)), (3, slice(24, 64)))]


def write_flat_tree(root, data, h=64, w=128):
    """img/{split}/f_00N.EXT + mask/{split}/f_00N{label ending}: the CamVid / WildDash2 layout of official CARB."""
    image_end, label_end = LAYOUT[data]
    rng = np.random.default_rng(0)
    for split, bands_per_image in (("train", FLAT_TRAIN), ("val", FLAT_VAL)):
        (root / "img" / split).mkdir(parents=True)
        (root / "mask" / split).mkdir(parents=True)
        for n, bands in enumerate(bands_per_image):
            lab = np.zeros((h, w), np.uint8)
            for index, rows in bands:
                lab[rows] = index
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "img" / split / f"f_00{n}{image_end}")
            Image.fromarray(lab).save(root / "mask" / split / f"f_00{n}{label_end}")
    return root


def test_wilddash2_pseudo_masks_can_hold_all_25_classes(tiny_clip_path, tmp_path):
    """Deviation: the official wilddash2 config gives CLIP range(19) of its 25 classes; carb gives it all 25."""
    args = carb.parse_args(["--data", "wilddash2", "--clip-model", str(tiny_clip_path), "--device", "cpu",
                            "--cache-dir", str(tmp_path)])
    scorer, classifier = carb.build_scorer(args, torch.device("cpu"))
    assert classifier.shape[0] == 25
    scores = scorer(torch.randn(1, 3, 32, 48)).clone()
    assert scores.shape == (1, 25, 2, 3)
    labels = torch.zeros(1, 25)
    labels[0, [3, 24]] = 1  # building and road marking
    scores[0, 24] = scores[0, 3] + 1  # road marking ahead of building everywhere: every pixel is class 24
    assert (carb.pseudo_mask(scores, labels, (32, 48)) == 24).all()


@pytest.mark.parametrize("data, iters, carb_start", [("camvid", 12, 4), ("cityscapes", 30, 16), ("synthetic", 400, 213)])
def test_ablation_starts_carb_at_each_datasets_official_ratio(data, iters, carb_start, tmp_path, monkeypatch):
    # CamVid's config: warmup_iter 4000 of 12000 iterations; Cityscapes': 16000 of 30000; synthetic: 213 of 400
    starts = []

    def fake_main(args):
        starts.append(args.carb_start)
        iou = torch.full((len(carb.DATASETS[args.data].classes),), 0.5)
        return {"pseudo-mask": iou, "model": iou}

    monkeypatch.setattr(carb, "main", fake_main)
    evaluation.ablation([str(a) for a in ["--data", data, "--iters", iters, "--out", tmp_path / "a"]])
    assert set(starts) == {iters, carb_start}  # the oracle, (a), (b): never (ITERS); the others: the official ratio


def test_class_tables_and_palettes():
    assert carb.DATASETS["camvid"].classes == CAMVID and carb.DATASETS["wilddash2"].classes == WILDDASH2
    assert carb.DATASETS["camvid"].clip_names == [c.lower() for c in CAMVID]
    assert len(carb.DATASETS["wilddash2"].clip_names) == 25
    for data, colours in COLOURS.items():
        mask = torch.tensor([list(colours) + [255]])
        assert [tuple(c) for c in evaluation.colorize(mask, data)[0].tolist()] == list(colours.values()) + [(0, 0, 0)]
    assert carb.DATASETS["synthetic"] is carb.DATASETS["cityscapes"]


@pytest.mark.parametrize("data", ["camvid", "wilddash2"])
def test_list_split_and_labels_in_the_flat_layout(data, tmp_path):
    root = write_flat_tree(tmp_path / data, data)
    images, gts = carb.list_split(str(root), "train", data)
    image_end, label_end = LAYOUT[data]
    assert images == [str(root / "img" / "train" / f"f_00{n}{image_end}") for n in (0, 1)]
    assert gts == [str(root / "mask" / "train" / f"f_00{n}{label_end}") for n in (0, 1)]
    assert [carb.image_id(p) for p in images] == ["f_000", "f_001"]
    ids = carb.read_train_ids(gts[1], data)  # class indices are train indices; 255 stays ignore
    assert ids[:10].eq(255).all() and ids[10:50].eq(3).all() and ids[50:].eq(8).all()
    labels = carb.image_level_labels(gts, len(carb.DATASETS[data].classes), str(tmp_path / "cache"), images, data)
    assert [set(row.nonzero().flatten().tolist()) for row in labels] == [{0, 1, 3}, {3, 8}]


@pytest.mark.parametrize("data, value, culprit", [("camvid", 11, "0-10"), ("wilddash2", 25, "0-24"),
                                                  ("camvid", 33, "0-10")])  # 33 is a Cityscapes labelId, not CamVid
def test_label_values_are_checked_per_dataset(data, value, culprit, tmp_path):
    root = write_flat_tree(tmp_path / data, data)
    path = root / "mask" / "val" / ("f_001" + LAYOUT[data][1])
    label = np.array(Image.open(path))
    label[0, :2] = value
    Image.fromarray(label).save(path)
    with pytest.raises(carb.CarbError) as e:
        carb.read_train_ids(str(path), data)
    assert all(s in str(e.value) for s in (str(path), f"[{value}]", culprit)), str(e.value)


def test_help_shows_every_datasets_defaults():
    text = " ".join(carb.get_args_parser().format_help().split())
    camvid, wilddash2 = (text.split(f"{name}: ")[1].split(": ")[0] for name in ("camvid", "wilddash2"))
    for expected in ("iters 12000", "crop (720, 960)", "scale_range (1.0, 4.0)", "multiplier (2.0, 0.5)",
                     "carb_start 4000"):
        assert expected in camvid, expected
    for expected in ("iters 30000", "carb_start 16000", "base_size (1024, 2048)"):
        assert expected in wilddash2, expected
    assert "--image-labels FILE" in text


@pytest.mark.parametrize("data", ["camvid", "wilddash2"])
def test_train_and_eval_on_the_flat_layout(data, tiny_clip_path, tmp_path, capsys):
    """Training, its table and checkpoint; eval.py takes --data from the checkpoint, writes class-index PNGs and
    pictures in the dataset's palette, and scores those PNGs again through --pred-dir (trainid by default)."""
    root, run = write_flat_tree(tmp_path / data, data), tmp_path / "run"
    carb.run(["--data", data, "--data-root", root, "--out", run, "--iters", 2, "--batch-size", 2, "--crop", 32, 64,
              "--scale-range", 0.1, 0.15, "--window", 16, 16, "--carb-start", 1, "--val-every", 2, "--workers", 0,
              "--backbone", "mobilenet_v3_large", "--backbone-weights", "none", "--clip-model", tiny_clip_path,
              "--cache-dir", tmp_path / "cache", "--device", "cpu"])
    out = capsys.readouterr().out
    names = CAMVID if data == "camvid" else WILDDASH2
    assert re.search(r"^model mIoU: \d+\.\d\d$", out, re.M) and re.search(r"^per-class table: python eval.py ", out, re.M)
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert ckpt["model"]["text_classifier"].shape == (len(names), 32) and ckpt["args"]["data"] == data

    saved, vis = tmp_path / "saved", tmp_path / "vis"
    model = run_eval("--data-root", root, "--ckpt", run / "last.pth", "--save-dir", saved, "--vis", vis,
                     "--clip-model", tiny_clip_path, "--cache-dir", tmp_path / "cache", "--workers", 0)["model"]
    assert sorted(os.listdir(saved)) == ["f_000_trainIds.png", "f_001_trainIds.png"]
    assert all(np.array(Image.open(saved / n)).max() < len(names) for n in os.listdir(saved))
    strip = Image.open(vis / "f_000.png").convert("RGB")  # image | pseudo-mask | model | GT; GT row 5 is class 0
    assert strip.width == 4 * 128 and strip.getpixel((3 * 128 + 5, 16 + 5)) == COLOURS[data][0]
    assert list(model["classes"]) == names
    scored = {name for name, c in model["classes"].items() if c["iou"] is not None}
    assert {names[c] for c in (0, 1, 3, 8)} <= scored  # the val GT's classes; a predicted one may be added
    again = run_eval("--data", data, "--data-root", root, "--pred-dir", saved, "--workers", 0)["predictions"]
    assert again == model
    with pytest.raises(carb.CarbError, match="labelid is the Cityscapes benchmark's format"):
        run_eval("--data", data, "--data-root", root, "--pred-dir", saved, "--pred-format", "labelid")


def test_oracle_trains_on_the_gt_train_ids_only_when_asked(tree, tmp_path, monkeypatch, capsys):
    """--oracle: each sample carries its GT as trainIds (road 7 -> 0, car 26 -> 13, unlabeled 0 -> 255), CE, no local
    view; without it, samples carry no mask and no train label file is opened once the image-level labels exist."""
    opened = []
    read = carb.read_train_ids
    monkeypatch.setattr(carb, "read_train_ids", lambda path, data="cityscapes": opened.append(path) or read(path, data))
    argv = [str(a) for a in small_argv(tree, tmp_path)]
    plain = carb.parse_args(argv)
    train_set = carb.prepare_data(plain, torch.device("cpu"), 0, 1, lambda: None)[0]
    opened.clear()
    assert all(len(train_set[(k, k % 2)]) == 3 for k in range(4)) and opened == []
    oracle = carb.parse_args(argv + ["--oracle"])
    assert oracle.no_local_view and oracle.carb_start == oracle.iters == 2  # plain CE on the global view
    train_set = carb.prepare_data(oracle, torch.device("cpu"), 0, 1, lambda: None)[0]
    opened.clear()
    seen = set()
    for k in range(8):
        *_, mask = train_set[(k, 1)]  # image 1: rows 0-9 unlabeled, 10-49 road, 50-63 car, at 16-32x its size
        seen |= set(mask.unique().tolist())
    assert seen <= {0, 13, 255} and {0, 13} <= seen  # trainIds: a raw labelId (7, 26) never shows
    assert opened == [str(tree / "gtFine/train/city/x_000000_000001_gtFine_labelIds.png")] * 8
    with pytest.raises(carb.CarbError, match="--oracle reads the train GT masks, --image-labels says none"):
        carb.parse_args(argv + ["--oracle", "--image-labels", str(tmp_path / "tags.json")])
    carb.run(argv + ["--oracle"])
    assert "(--oracle: trained on GT masks: not CARB results)" in capsys.readouterr().out
    code, err = run_carb(capsys, *(argv[:-2] + ["--resume", "--device", "cpu"]))  # the oracle run, without --oracle
    assert_one_line_error(code, err, "--oracle True, not False")


def test_image_labels_json_gives_the_masks_labels(tmp_path):
    root = write_flat_tree(tmp_path / "camvid", "camvid")
    images, gts = carb.list_split(str(root), "train", "camvid")
    from_masks = carb.image_level_labels(gts, 11, str(tmp_path / "cache"), images, "camvid")
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({"f_000": ["Sky", "building", "ROAD"], "f_001": ["Road", "Car"], "f_009": []}))
    shutil.rmtree(root / "mask")
    assert torch.equal(carb.read_image_labels(str(tags), images, "camvid"), from_masks)


def test_training_from_image_labels_reads_no_train_mask(tree, tmp_path, capsys, monkeypatch):
    shutil.rmtree(tree / "gtFine" / "train")
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({"x_000000_000000": ["sky", "building", "road"], "x_000000_000001": ["road", "car"]}))
    read = []
    real_read = carb.read_train_ids
    monkeypatch.setattr(carb, "read_train_ids", lambda path, *a: read.append(path) or real_read(path, *a))
    carb.run([str(a) for a in small_argv(tree, tmp_path, "--image-labels", tags)])
    assert re.search(r"^model mIoU: ", capsys.readouterr().out, re.M)
    assert read and all(os.sep + "val" + os.sep in p for p in read)  # validation only
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("image_labels_*"))


@pytest.mark.parametrize("content, culprits", [
    ({"x_000000_000000": ["sky"]}, ["x_000000_000001", "no entry"]),
    ({"x_000000_000000": ["sky"], "x_000000_000001": ["tree"]}, ["x_000000_000001", "'tree'", "vegetation"]),
    ('{"x_000000_000000": ["sky"],', ["not JSON"]),
    (["sky"], ["JSON object"]),
])
def test_image_labels_errors_name_the_file_and_entry(content, culprits, tree, tmp_path, capsys):
    tags = tmp_path / "tags.json"
    tags.write_text(content if isinstance(content, str) else json.dumps(content))
    code, err = run_carb(capsys, *small_argv(tree, tmp_path, "--image-labels", tags))
    assert_one_line_error(code, err, "--image-labels", tags, *culprits)
    assert not (tmp_path / "run").exists()


def test_simulated_clip_is_refused_for_other_classes(tmp_path, capsys):
    root = write_flat_tree(tmp_path / "camvid", "camvid")
    code, err = run_carb(capsys, "--data", "camvid", "--data-root", root, "--out", tmp_path / "run",
                         "--clip-model", "simulated", "--cache-dir", tmp_path / "cache")
    assert_one_line_error(code, err, "--clip-model simulated", "--data camvid")
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_checkpoint_of_other_classes(trained, tmp_path):
    root = write_flat_tree(tmp_path / "camvid", "camvid")
    with pytest.raises(carb.CarbError, match="trained with --data cityscapes.*pass --data cityscapes"):
        run_eval("--data", "camvid", "--data-root", root, "--ckpt", trained["run"] / "last.pth")


def test_readme_wilddash2_conversion(tmp_path):
    """The README's WildDash2 snippet, on a fake export: WildDash2 labelIds -> the 25 class indices, img/ + mask/."""
    readme = open(os.path.join(REPO, "README.md")).read()
    start = readme.index("```python\n# wd2_to_carb.py") + len("```python\n")
    script = tmp_path / "wd2_to_carb.py"
    script.write_text(readme[start:readme.index("```", start)])
    wd2, label_ids, out = tmp_path / "wd_public_v2p0", tmp_path / "labelIds", tmp_path / "wilddash2"
    (wd2 / "images").mkdir(parents=True)
    label_ids.mkdir()
    # WildDash2 ids: 0 unlabeled, 1 ego vehicle, 7 road, 29 caravan (not evaluated), 38 road-marking
    for name, values in (("a", [0, 1, 7, 29, 38]), ("b", [7, 7, 1, 1, 34])):
        Image.fromarray(np.zeros((1, 5, 3), np.uint8)).save(wd2 / "images" / f"{name}.jpg")
        Image.fromarray(np.array([values], np.uint8)).save(label_ids / f"{name}_labelIds.png")
    (tmp_path / "val.txt").write_text("b\n")
    r = subprocess.run([sys.executable, script, wd2, label_ids, out, tmp_path / "val.txt"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (_, a_label), (_, b_label) = (carb.list_split(str(out), split, "wilddash2") for split in ("train", "val"))
    assert carb.read_train_ids(a_label[0], "wilddash2").tolist() == [[255, 0, 1, 255, 24]]
    assert carb.read_train_ids(b_label[0], "wilddash2").tolist() == [[1, 1, 0, 0, 20]]


# ---------------------------------------------------------------------------------------------------
# Performance and scale: precomputed global masks, --profile, --benchmark, torchrun
# ---------------------------------------------------------------------------------------------------

def test_infinite_sampler_ranks_deal_out_the_single_process_stream():
    """N ranks of batch B: at iteration t the ranks' batches together are the one-process batch t of size N*B
    (same samples k, same images), rank r holding its r-th run of B; resuming at t starts every rank there."""
    n, B, N = 5, 3, 2
    take = lambda sampler, count: [s for _, s in zip(range(count), sampler)]  # noqa: E731
    single = take(carb.InfiniteSampler(n, seed=1, start=0), 4 * N * B)
    ranks = [take(carb.InfiniteSampler(n, seed=1, start=0, rank=r, world=N, batch=B), 4 * B) for r in range(N)]
    for t in range(4):
        for r in range(N):
            assert ranks[r][t * B:(t + 1) * B] == single[t * N * B + r * B:t * N * B + (r + 1) * B]
    resumed = take(carb.InfiniteSampler(n, seed=1, start=2 * N * B, rank=1, world=N, batch=B), B)
    assert resumed == ranks[1][2 * B:3 * B]
    # the one-process stream: sample numbers 0, 1, 2, ...; each epoch (n consecutive samples) is a permutation of
    # the n images, and the epochs are shuffled anew
    stream = [s for _, s in zip(range(6 * n), carb.InfiniteSampler(n, seed=1))]
    assert [k for k, _ in stream] == list(range(6 * n))
    epochs = [tuple(i for _, i in stream[e * n:(e + 1) * n]) for e in range(6)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs), epochs
    assert len(set(epochs)) == 6, epochs
    # resuming in the middle of an epoch (sample 7 = epoch 1, position 2) continues that epoch's permutation
    assert take(carb.InfiniteSampler(n, seed=1, start=7), 8) == stream[7:15]


QUADRANTS = {(255, 0, 0): 1, (0, 255, 0): 2, (0, 0, 255): 3, (255, 255, 0): 4}  # colour -> class in the mask


def test_global_mask_gets_its_images_rescale_crop_flip_and_padding(tmp_path):
    """An image of four coloured quadrants and a mask of the same quadrants: wherever an augmented pixel still has
    a pure quadrant colour, the augmented mask holds that quadrant's class; padding is 255 exactly where valid_hw
    says; the image is the same crop as without the mask (the mask takes no randomness)."""
    img, mask = np.zeros((64, 128, 3), np.uint8), np.zeros((64, 128), np.uint8)
    top, bottom, left, right = slice(0, 24), slice(24, None), slice(0, 40), slice(40, None)
    for (colour, cls), (rows, cols) in zip(QUADRANTS.items(), [(top, left), (top, right), (bottom, left),
                                                               (bottom, right)]):
        img[rows, cols], mask[rows, cols] = colour, cls
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    args = dict(images=[str(tmp_path / "a.png")], labels=torch.ones(1, C), crop=(48, 96), base_size=(64, 128),
                scale_range=(0.5, 2.0), seed=0, photometric=False)
    with_mask = carb.WeakTrainSet(**args, global_masks=[str(tmp_path / "a_mask.png")])
    padded = flipped = 0
    for k in range(40):
        image, _, valid_hw, m = with_mask[(k, 0)]
        assert torch.equal(image, carb.WeakTrainSet(**args)[(k, 0)][0])
        assert m.dtype == torch.uint8 and m.shape == (48, 96)
        h, w = valid_hw.tolist()
        assert m[h:].eq(255).all() and m[:, w:].eq(255).all() and set(m[:h, :w].unique().tolist()) <= {1, 2, 3, 4}
        padded += h < 48 or w < 96
        pixels = image.permute(1, 2, 0)
        for colour, cls in QUADRANTS.items():
            pure = (pixels == torch.tensor(colour, dtype=torch.uint8)).all(-1)
            assert m[pure].eq(cls).all(), (k, cls)
        flipped += bool(m[:h, :w][0, 0] == 2 or m[:h, :w][-1, 0] == 4)  # a right quadrant on the left: flipped
    assert padded and flipped  # both cases were seen


def test_precompute_global_masks_restricted_sharded_and_cached(tree, tmp_path):
    images, gts = carb.list_split(str(tree), "train")
    labels = carb.image_level_labels(gts, C, str(tmp_path / "cache"))
    sim = carb.SimulatedCLIP()
    calls = []

    def scorer(x):
        calls.append(tuple(x.shape))
        return sim(x)

    run_args = argparse.Namespace(base_size=(48, 96), clip_model="simulated", cache_dir=str(tmp_path / "cache"),
                                  dense_clip="maskclip")
    args = (sim.text_classifier, images, labels, run_args, "cpu")
    paths = carb.precompute_global_masks(scorer, *args, rank=1, world=2)  # rank 1 of 2: image 1 only
    assert calls == [(1, 3, 48, 96)] and [os.path.isfile(p) for p in paths] == [False, True]
    assert carb.precompute_global_masks(scorer, *args) == paths and len(calls) == 2  # then image 0 alone
    for path, ids in zip(paths, TRAIN_EXPECTED):
        mask = np.array(Image.open(path))
        assert mask.shape == (48, 96)  # 64x128 at base size 48x96
        assert set(np.unique(mask).tolist()) <= ids  # restricted to the image-level labels
    assert carb.precompute_global_masks(scorer, *args) == paths and len(calls) == 2  # cached: no CLIP call
    run_args.base_size = (64, 128)
    other = carb.precompute_global_masks(scorer, sim.text_classifier, images, labels, run_args, "cpu")
    assert os.path.dirname(other[0]) != os.path.dirname(paths[0])  # another base size, another folder


def test_train_one_step_takes_the_global_mask_from_the_batch():
    """Four items in the batch: CLIP runs once (on the window); the global loss is the CE against the given mask."""
    torch.manual_seed(0)
    logits = torch.randn(1, C, 32, 64)
    given = torch.randint(0, C, (1, 32, 64), dtype=torch.uint8)
    given[:, :4] = 255
    calls = []

    def scorer(x):
        calls.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], C, x.shape[-2] // 16, x.shape[-1] // 16)

    batch = (torch.zeros(1, 3, 32, 64, dtype=torch.uint8), torch.ones(1, C), torch.tensor([[32, 64]]), given)
    weights = nn.Parameter(logits.clone())
    logs = carb.train_one_step(lambda x: weights * 1, torch.optim.SGD([weights], lr=0.0), scorer, batch,
                               (0, 0, 16, 16, 1.0), False, None, torch.device("cpu"))
    assert calls == [(16, 16)]
    expected = F.cross_entropy(logits, given.long(), ignore_index=255)
    assert math.isclose(logs["global"], expected.item(), rel_tol=1e-5)


def test_profile_and_precomputed_masks_run_end_to_end(tree, tmp_path, capsys):
    carb.run([str(a) for a in small_argv(tree, tmp_path, "--profile", "--global-masks", "precompute")])
    out = capsys.readouterr().out
    table = out[out.index("phase"):]
    rows = {}  # phase: (total s, ms/step, % of step)
    for phase in carb.Stopwatch.STEP + ["step"]:
        found = re.search(rf"^{re.escape(phase)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", table, re.M)
        assert found, (phase, table)
        rows[phase] = tuple(map(float, found.groups()))
    # the step is its phases: printed to 0.01 s, so each of the 6 + 1 rows may be off by up to 0.005
    phases = [rows[p] for p in carb.Stopwatch.STEP]
    assert rows["step"][0] == pytest.approx(sum(t for t, _, _ in phases), abs=0.01 * (len(phases) + 1)), table
    assert rows["step"][2] == 100.0 and sum(pct for _, _, pct in phases) == pytest.approx(100, abs=0.05 * 6)
    for total, ms, _ in phases + [rows["step"]]:  # 2 steps: ms/step = 1000 * total / 2, both rounded
        assert ms == pytest.approx(500 * total, abs=500 * 0.005 + 0.05), table
    assert len(list((tmp_path / "cache").glob("global_masks_*/*.png"))) == 2
    assert re.search(r"^model mIoU: ", out, re.M)


def test_benchmark_prints_its_two_lines(capsys):
    """The benchmark's code path at toy size and one round (the real one takes minutes: README, Performance)."""
    evaluation.benchmark(["--device", "cpu", "--crop", "32", "64", "--window", "32", "16", "--backbone",
                          "mobilenet_v3_large"], steps=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"step/unavoidable: \d+\.\d\d", lines[-2]) and re.fullmatch(r"carb share: \d+\.\d%", lines[-1])


def test_distributed_region_balancer_history_is_the_mean_of_the_ranks_ces(monkeypatch):
    """Two ranks simulated in one process: all_reduce sums this rank's [CE(R_c), CE(R_i)] with the other rank's.
    Both ranks store the mean over the ranks and get the same w (window 2, coeff 0.5), all worked out by hand."""
    ces = [[(1.5, 0.5), (0.5, 1.5)], [(2.0, 1.0), (1.0, 0.25)], [(0.75, 3.0), (0.25, 1.0)]]  # [iteration][rank]
    now = {}

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        assert op == torch.distributed.ReduceOp.SUM and not async_op
        it, rank = now["it"], now["rank"]
        assert tensor.tolist() == list(ces[it][rank])  # this rank's [CE(R_c), CE(R_i)], in that order
        tensor += torch.tensor(ces[it][1 - rank])

    monkeypatch.setattr(carb.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(carb.dist, "get_world_size", lambda group=None: 2)
    balancers = [carb.DistributedRegionBalancer(coeff=0.5, window=2) for _ in range(2)]
    # means over the ranks: (1.0, 1.0), (1.5, 0.625), (0.5, 2.0); w = 0.5 * mean(last 2 c) / mean(last 2 i)
    expected = [([1.0], [1.0], 0.5 * 1.0 / 1.0),
                ([1.0, 1.5], [1.0, 0.625], 0.5 * 1.25 / 0.8125),
                ([1.5, 0.5], [0.625, 2.0], 0.5 * 1.0 / 1.3125)]
    for it, (consistent, inconsistent, w) in enumerate(expected):
        for rank, balancer in enumerate(balancers):
            now.update(it=it, rank=rank)
            c, i = ces[it][rank]
            assert balancer.update(torch.tensor(c), torch.tensor(i)) == pytest.approx(w)
            assert balancer.consistent == consistent and balancer.inconsistent == inconsistent
            assert balancer.weight == pytest.approx(w)
    assert balancers[0].state_dict() == balancers[1].state_dict()


TORCHRUN_WRAPPER = '''
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
import carb

kill_at, dumps, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
writes, seen, calls = [], {{}}, []


def audit(event, args):  # every file this process creates, writes, renames or removes under the test's folder
    if event == "open":
        path, mode, flags = args
        if not (flags & (os.O_WRONLY | os.O_RDWR) if mode is None else set(str(mode)) & set("wax+")):
            return
    elif event not in ("os.rename", "os.remove", "os.mkdir"):
        return
    if str(args[0]).startswith({watched!r}) and "writes" in seen:
        writes.append((event, str(args[0])))


def step(model, optimizer, scorer, batch, window, carb_on, balancer, *rest):
    seen["model"] = model
    if carb_on:
        seen["balancer"] = balancer
    calls.append(1)
    if len(calls) == kill_at and os.environ["RANK"] == "0":  # a SIGTERM to rank 0 alone, during this iteration
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(model, optimizer, scorer, batch, window, carb_on, balancer, *rest)


seen["writes"], code = True, 0
sys.addaudithook(audit)
real_step, carb.train_one_step = carb.train_one_step, step
try:
    carb.run(argv)
except SystemExit as e:
    code = e.code
del seen["writes"]
torch.save({{"params": dict(seen["model"].module.named_parameters()), "balancer": seen["balancer"].state_dict(),
            "writes": writes}}, os.path.join(dumps, "rank" + os.environ["RANK"] + ".pt"))
sys.exit(code)
'''


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    """torchrun with 2 processes, gloo on CPU, through a wrapper that records each rank's final parameters and
    balancer and every file it writes; and one uninterrupted 4-iteration run."""
    base = tmp_path_factory.mktemp("torchrun")
    tree = write_tree(base / "cityscapes")
    script = base / "rank.py"
    script.write_text(TORCHRUN_WRAPPER.format(repo=REPO, watched=str(base)))

    def launch(name, kill_at=0, *extra, script=script):
        (base / name / "dumps").mkdir(parents=True, exist_ok=True)
        argv = small_argv(tree, base / name, "--iters", 4, "--val-every", 2, *extra)
        wrapper = [kill_at, base / name / "dumps"] if script.name == "rank.py" else []
        r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *wrapper, *argv,
                home=base)
        ranks = [torch.load(p, weights_only=True) for p in sorted((base / name / "dumps").glob("rank*.pt"))]
        return r, ranks, base / name / "run"

    return dict(launch=launch, straight=launch("straight"))


def test_torchrun_two_ranks_on_cpu_same_weights_only_rank_0_writes(torchrun):
    """After 4 steps both ranks hold the same parameters (rank 0's checkpoint too) and the same balancer; rank 1
    created, wrote, renamed or removed no file at all; rank 0 printed the result once."""
    r, ranks, run = torchrun["straight"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(re.findall(r"^model mIoU: ", r.stdout, re.M)) == 1
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert ckpt["iteration"] == 4 and len(ckpt["balancer"]["consistent"]) == 3
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]) and torch.equal(p, ckpt["model"][name]), name
    assert ranks[0]["balancer"] == ranks[1]["balancer"] == ckpt["balancer"]
    assert ranks[1]["writes"] == []
    written = {os.path.relpath(path, run.parent) for _, path in ranks[0]["writes"]}
    assert {"run/last.pth.tmp", "run/log.csv"} <= written
    assert len((run / "log.csv").read_text().splitlines()) == 1 + 4


def test_torchrun_sigterm_to_one_rank_stops_both_and_resumes_exactly(torchrun):
    """SIGTERM to rank 0 alone during iteration 2: both ranks stop after it, rank 0 saves and says how to continue;
    the printed torchrun command, with another --workers, ends with the uninterrupted run's log.csv and weights."""
    r, ranks, run = torchrun["launch"]("stopped", 3)
    assert r.returncode != 0 and "Traceback" not in r.stderr.split("failed (exitcode")[0]  # torchrun's own follows
    assert len(re.findall(rf"stopped by SIGTERM after iteration 3; saved {re.escape(str(run / 'last.pth'))}",
                          r.stderr)) == 1
    assert torch.load(run / "last.pth", weights_only=True)["iteration"] == 3
    assert all(torch.equal(p, ranks[1]["params"][name]) for name, p in ranks[0]["params"].items())
    command = shlex.split(re.search(r"to continue: (.*)", r.stderr).group(1))
    assert command[:3] == ["torchrun", "--nproc_per_node=2", "carb.py"] and command[-1] == "--resume"
    resumed = cli("-m", "torch.distributed.run", "--standalone", *command[1:], "--workers", 1, home=run.parent)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torchrun["straight"][2]
    assert (run / "log.csv").read_text() == (straight / "log.csv").read_text()
    a, b = (torch.load(p / "last.pth", weights_only=True) for p in (run, straight))
    assert a["iteration"] == b["iteration"] == 4 and a["balancer"] == b["balancer"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


# ---------------------------------------------------------------------------------------------------
# Dense CLIP variants (--dense-clip): MaskCLIP, SCLIP, ClearCLIP, NACLIP in the last block
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips_by_heads(tmp_path_factory):
    """Tiny random CLIPs with 1 and 2 vision heads (vision width 64 per head), loaded through clip.load(path)."""
    models = {}
    for heads in (1, 2):
        torch.manual_seed(heads)
        model = clip.model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64 * heads,
                                vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=64,
                                transformer_heads=1, transformer_layers=1)
        path = tmp_path_factory.mktemp("clips") / f"clip_{heads}_heads.pt"
        torch.save(model.state_dict(), path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[heads] = clip.load(str(path), device="cpu", jit=False)[0].eval()
        assert models[heads].visual.transformer.resblocks[-1].attn.num_heads == heads
    return models


def omega_by_loops(gh, gw, sigma=5.0):
    """NACLIP's bias from its definition, pair by pair: token 0 is CLS (0 in its row and column), token 1 + r*gw + c
    is the patch in row r, column c."""
    omega = torch.zeros(gh * gw + 1, gh * gw + 1)
    for i in range(gh * gw):
        for j in range(gh * gw):
            (ri, ci), (rj, cj) = divmod(i, gw), divmod(j, gw)
            omega[i + 1, j + 1] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma ** 2))
    return omega


def reference_dense_clip(model, images, classifier, variant):
    """The issue's four last blocks, image by image and head by head in plain loops, on the tokens that CLIP's own
    forward pass feeds its last block (positional embedding resized as in reference_maskclip)."""
    vit = copy.deepcopy(model.visual)
    b, gh, gw, n = images.shape[0], images.shape[-2] // 16, images.shape[-1] // 16, vit.input_resolution // 16
    pos = vit.positional_embedding.detach()
    grid = F.interpolate(pos[1:].T.reshape(1, -1, n, n), size=(gh, gw), mode="bicubic", align_corners=False)
    vit.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid.reshape(-1, gh * gw).T]))
    last, seen = vit.transformer.resblocks[-1], {}
    last.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    with torch.no_grad():
        vit(images)
        x = seen["x"]  # [1 + gh*gw, B, width]
        d, heads = x.shape[-1], last.attn.num_heads
        hd = d // heads
        w_q, w_k, w_v = last.attn.in_proj_weight.split(d)
        b_q, b_k, b_v = last.attn.in_proj_bias.split(d)
        attended = torch.empty_like(x)
        for image in range(b):
            x_hat, outputs = last.ln_1(x[:, image]), []
            for h in range(heads):
                cut = slice(h * hd, (h + 1) * hd)
                q, k, v = (x_hat @ w[cut].T + bias[cut] for w, bias in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
                softmax = lambda scores: torch.softmax(scores / math.sqrt(hd), dim=1)  # noqa: E731  over keys
                A = {"maskclip": lambda: torch.eye(len(x)),
                     "sclip": lambda: softmax(q @ q.T) + softmax(k @ k.T),
                     "clearclip": lambda: softmax(q @ q.T),
                     "naclip": lambda: torch.softmax(k @ k.T / math.sqrt(hd) + omega_by_loops(gh, gw), dim=1)}[variant]()
                outputs.append(A @ v)
            attended[:, image] = last.attn.out_proj(torch.cat(outputs, dim=1))
        if variant in ("maskclip", "sclip"):
            y = x + attended
            y = y + last.mlp(last.ln_2(y))
        else:
            y = attended
        patches = vit.ln_post(y[1:]) @ vit.proj
        patches = patches / patches.norm(dim=-1, keepdim=True)
        text = classifier / classifier.norm(dim=-1, keepdim=True)
        return torch.einsum("nbd,cd->bcn", patches, text).reshape(b, -1, gh, gw)


@pytest.mark.parametrize("variant", ["maskclip", "sclip", "clearclip", "naclip"])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("size", [(48, 80), (112, 64)])
def test_dense_clip_variants_equal_their_formulas(clips_by_heads, unit_classifier, variant, heads, size):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(heads))
    scores = carb.maskclip_scores(clips_by_heads[heads], images, unit_classifier, variant=variant)
    assert scores.shape == (2, 5, size[0] // 16, size[1] // 16)
    expected = reference_dense_clip(clips_by_heads[heads], images, unit_classifier, variant)
    assert (scores - expected).abs().max() <= 1e-5


def test_dense_clip_variants_differ_and_default_is_maskclip(clips_by_heads, unit_classifier):
    images = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    default = carb.maskclip_scores(clips_by_heads[2], images, unit_classifier)
    assert torch.equal(default, carb.maskclip_scores(clips_by_heads[2], images, unit_classifier, variant="maskclip"))
    others = [carb.maskclip_scores(clips_by_heads[2], images, unit_classifier, variant=v)
              for v in ("sclip", "clearclip", "naclip")]
    assert all((o - default).abs().max() > 1e-3 for o in others)  # each formula changes the scores


def test_neighbourhood_bias_of_a_2x3_grid_by_hand():
    omega = carb.neighbourhood(2, 3)  # patches 1..6: (0,0) (0,1) (0,2) (1,0) (1,1) (1,2); sigma 5: 2 sigma^2 = 50
    assert omega.shape == (7, 7)
    assert (omega[0] == 0).all() and (omega[:, 0] == 0).all()  # the CLS token's row and column
    assert omega[1:, 1:].diagonal().tolist() == [1.0] * 6
    for (i, j), squared_distance in {(1, 2): 1, (1, 3): 4, (1, 4): 1, (1, 5): 2, (1, 6): 5, (3, 4): 5, (2, 5): 1}.items():
        assert omega[i, j].item() == pytest.approx(math.exp(-squared_distance / 50), rel=1e-6)
        assert omega[j, i] == omega[i, j]


def test_neighbourhood_bias_is_made_once_per_grid_and_device_and_attention_is_sdpa(clips_by_heads, unit_classifier,
                                                                                  monkeypatch):
    carb.neighbourhood.cache_clear()
    assert carb.neighbourhood(3, 5, torch.device("cpu")) is carb.neighbourhood(3, 5, torch.device("cpu"))
    calls, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(carb.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    images = torch.randn(1, 3, 48, 80)
    carb.neighbourhood.cache_clear()
    for _ in range(2):
        carb.maskclip_scores(clips_by_heads[2], images, unit_classifier, variant="naclip")
    info = carb.neighbourhood.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # built at the first call, on the device; the second reuses it
    assert sum("attn_mask" in k for k in calls) == 2  # the last block: one fused attention per call, biased
    counts = {}
    for variant in carb.DENSE_CLIP:  # the earlier blocks (nn.MultiheadAttention) call it too, alike for all variants
        calls.clear()
        carb.maskclip_scores(clips_by_heads[2], images, unit_classifier, variant=variant)
        counts[variant] = len(calls)
    base = counts["maskclip"]  # its last block is the value path alone: no attention
    assert counts == {"maskclip": base, "sclip": base + 2, "clearclip": base + 1, "naclip": base + 1}


def test_carb_py_never_imports_eval():
    import ast
    tree = ast.parse(open(os.path.join(REPO, "carb.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "eval" not in imported, "carb.py trains; eval.py imports carb, never the reverse"
    source = open(os.path.join(REPO, "carb.py")).read()
    assert "sys.modules" not in source and "importlib" not in source and "__import__" not in source


def test_experiments_run_from_eval_py_and_carb_py_points_there(tmp_path, capsys):
    code, err = run_carb(capsys, "--data", "synthetic", "--ablation")
    assert_one_line_error(code, err, "--ablation", "python eval.py --ablation")
    r = cli("eval.py", "--ablation", "--data", "synthetic", "--iters", 0, home=tmp_path)  # carb.py's flags, checked
    assert r.returncode == 2 and error_lines(r.stderr) == [r.stderr.strip()], r.stderr
    assert "--iters" in r.stderr and "0 must be at least 1" in r.stderr


def test_dense_clip_flag_reaches_both_views_the_checkpoint_and_refuses_another_on_resume(
        tree, tmp_path, tiny_clip_path, capsys, monkeypatch):
    calls, real = [], carb.maskclip_scores

    def spy(clip_model, images, text_classifier, variant="maskclip"):
        calls.append((tuple(images.shape[-2:]), variant))
        return real(clip_model, images, text_classifier, variant)

    monkeypatch.setattr(carb, "maskclip_scores", spy)
    argv = small_argv(tree, tmp_path, "--clip-model", tiny_clip_path, "--dense-clip", "naclip", "--window", 32, 32,
                      "--multiplier", 0, 2)
    carb.run([str(a) for a in argv])
    training = [c for c in calls if c[0] in ((64, 128), (64, 64))]  # the crop, then the window up-scaled x2
    assert {c[0] for c in training} == {(64, 128), (64, 64)} and {c[1] for c in training} == {"naclip"}
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["args"]["dense_clip"] == "naclip"
    capsys.readouterr()
    code, err = run_carb(capsys, *argv[:-6], "--dense-clip", "sclip", "--iters", 3, "--resume")
    assert_one_line_error(code, err, "--dense-clip naclip", "not sclip")


def test_dense_clip_other_than_maskclip_is_refused_with_the_simulated_clip(tree, tmp_path, capsys):
    code, err = run_carb(capsys, *small_argv(tree, tmp_path, "--dense-clip", "clearclip"))
    assert_one_line_error(code, err, "--dense-clip clearclip", "simulated")
    assert not (tmp_path / "run").exists()


def test_eval_dense_clip_gives_a_column_per_variant(trained, tmp_path):
    common = ["--data", "cityscapes", "--data-root", trained["root"], "--clip", "--clip-model", trained["clip"],
              "--cache-dir", tmp_path / "cache", "--workers", 0]
    single = run_eval(*common)
    both = run_eval(*common, "--dense-clip", "maskclip", "naclip", "--clip-scale", 2)
    assert list(both) == ["pseudo-mask maskclip", "pseudo-mask maskclip x2 1x1", "pseudo-mask naclip",
                          "pseudo-mask naclip x2 1x1"]
    assert both["pseudo-mask maskclip"] == single["pseudo-mask"]


# ---------------------------------------------------------------------------------------------------
# Issue 13: caches that follow their files, errors mid-run that keep the work
# ---------------------------------------------------------------------------------------------------

def test_image_level_labels_follow_a_label_file_changed_in_place(tree, tmp_path):
    _, gts = carb.list_split(str(tree), "train")
    assert carb.image_level_labels(gts, C, str(tmp_path / "cache"))[1].nonzero().flatten().tolist() == [0, 13]
    Image.fromarray(np.full((64, 128), 21, np.uint8)).save(gts[1])  # now all vegetation (trainId 8)
    assert carb.image_level_labels(gts, C, str(tmp_path / "cache"))[1].nonzero().flatten().tolist() == [8]


def test_text_embeddings_follow_a_clip_file_changed_in_place(tmp_path, tiny_clip_path):
    clip_file = tmp_path / "clip.pt"
    shutil.copy(tiny_clip_path, clip_file)
    args = argparse.Namespace(data="cityscapes", clip_model=str(clip_file), dense_clip="maskclip",
                              cache_dir=str(tmp_path / "cache"))
    _, before = carb.build_scorer(args, torch.device("cpu"))
    state = torch.load(clip_file, weights_only=True)
    state["text_projection"] = state["text_projection"].flip(1)  # other weights, same path
    torch.save(state, clip_file)
    _, after = carb.build_scorer(args, torch.device("cpu"))
    expected = carb.text_classifier(carb.load_clip(str(clip_file), "cpu"), carb.DATASETS["cityscapes"].clip_names)
    assert not torch.allclose(before, after) and torch.allclose(after, expected)


def test_precomputed_mask_follows_an_image_changed_in_place(tree, tmp_path):
    images, gts = carb.list_split(str(tree), "train")
    labels = carb.image_level_labels(gts, C, str(tmp_path / "cache"))
    sim = carb.SimulatedCLIP()
    args = argparse.Namespace(base_size=(64, 128), clip_model="simulated", cache_dir=str(tmp_path / "cache"),
                              dense_clip="maskclip")
    before = carb.precompute_global_masks(sim, sim.text_classifier, images, labels, args, "cpu")
    os.utime(images[0], ns=(0, 10 ** 9))  # touched: another modification time
    after = carb.precompute_global_masks(sim, sim.text_classifier, images, labels, args, "cpu")
    assert after[1] == before[1] and after[0] != before[0] and os.path.isfile(after[0])


def test_a_truncated_image_found_mid_run_keeps_the_finished_iterations(tmp_path, capsys):
    """Six train images, batch 2: the image at position 4 of epoch 0's permutation is first read at iteration 2. Made
    truncated, the run stops there with a one-line error naming it and last.pth at iteration 2; fixed and resumed,
    the run ends with the weights of an uninterrupted one."""
    tree = write_tree(tmp_path / "cityscapes")
    city = tree / "leftImg8bit" / "train" / "city"
    for n in range(2, 6):  # six train images in all
        shutil.copy(city / f"x_000000_00000{n % 2}_leftImg8bit.png", city / f"x_000000_00000{n}_leftImg8bit.png")
        shutil.copy(tree / "gtFine" / "train" / "city" / f"x_000000_00000{n % 2}_gtFine_labelIds.png",
                    tree / "gtFine" / "train" / "city" / f"x_000000_00000{n}_gtFine_labelIds.png")
    images, _ = carb.list_split(str(tree), "train")
    victim = images[torch.randperm(6, generator=torch.Generator().manual_seed(0 * 7919 + 0))[4].item()]

    def argv(out, *extra):
        return small_argv(tree, tmp_path, "--out", out, "--batch-size", 2, "--iters", 4, "--val-every", 4, *extra)

    carb.run([str(a) for a in argv(tmp_path / "straight")])
    capsys.readouterr()
    good = pathlib.Path(victim).read_bytes()
    truncate(pathlib.Path(victim))
    code, err = run_carb(capsys, *argv(tmp_path / "broken"))
    assert_one_line_error(code, err, victim, "truncated", tmp_path / "broken" / "last.pth", "iteration 2", "--resume")
    assert torch.load(tmp_path / "broken" / "last.pth", weights_only=True)["iteration"] == 2
    pathlib.Path(victim).write_bytes(good)
    carb.run([str(a) for a in argv(tmp_path / "broken", "--resume")])
    a = torch.load(tmp_path / "broken" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("file, data", [(np.dstack([np.full((64, 128), 7, np.uint8)] * 3), "cityscapes")])
def test_a_three_channel_label_file_is_refused(file, data, tmp_path, capsys):
    tree = write_tree(tmp_path / "cityscapes")
    path = tree / "gtFine" / "train" / "city" / "x_000000_000000_gtFine_labelIds.png"
    Image.fromarray(file).save(path)
    code, err = run_carb(capsys, *small_argv(tree, tmp_path))
    assert_one_line_error(code, err, path, "3 channels")


@pytest.mark.parametrize("ext", ["png", "jpg"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_pillow_reads_images_as_torchvision_decodes_them(ext, mode, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    path = tmp_path / f"image.{ext}"
    (image.convert("RGB") if ext == "jpg" else image).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders: the reason carb uses Pillow
        expected = torchvision.io.decode_image(str(path), mode=torchvision.io.ImageReadMode.RGB)
    assert torch.equal(carb.read_file(str(path)), expected)


@pytest.mark.parametrize("extra, culprit", [
    (["--multiplier", 1, 0], "--multiplier: OFFSET must be above 0"),
    (["--lr", 0], "--lr: 0 must be above 0"),
    (["--lr", 0.001, "--min-lr", 0.01], "--min-lr 0.01 is above --lr 0.001"),
    (["--region-weight", "heavy"], "--region-weight heavy"),
    (["--region-weight", "-1"], "--region-weight -1"),
    (["--crop", 8, 128], "--crop: 8 must be at least 16"),
    (["--window", 48, 8], "--window: 8 must be at least 16"),
    (["--val-every", 0], "--val-every: 0 must be at least 1"),
])
def test_each_argument_refusal_is_one_line(extra, culprit, tree, tmp_path, capsys):
    code, err = run_carb(capsys, *small_argv(tree, tmp_path, *extra))
    assert_one_line_error(code, err, culprit)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, culprits", [
    (lambda argv, out: argv + ["--optimizer", "adamw"], ["--optimizer sgd", "not adamw"]),
    (lambda argv, out: argv + ["--clip-model", "simulated"], ["--clip-model", "not simulated"]),
    (lambda argv, out: argv[:argv.index("--iters")] + ["--iters", "3"] + argv[argv.index("--iters") + 2:],
     ["is at iteration 4, beyond --iters 3"]),
    (lambda argv, out: (torch.save(dict(torch.load(out / "last.pth", weights_only=True), model={}), out / "last.pth"),
                        argv)[1], ["does not fit this run's model"]),
])
def test_each_resume_refusal_is_one_line(change, culprits, trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    argv = change([str(a) for a in trained["argv"](out, 6, "--resume")], out)
    before = snapshot(out)
    code, err = run_carb(capsys, *argv)
    assert_one_line_error(code, err, out / "last.pth", *culprits)
    assert snapshot(out) == before


def test_best_checkpoint_holds_the_best_validation_and_survives_a_resume(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    r = trained["train"](out, 8, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "log.csv") as f:
        vals = {int(row["iteration"]) + 1: float(row["val_miou"]) for row in csv.DictReader(f) if row["val_miou"]}
    assert sorted(vals) == [2, 4, 6, 8]  # 2 and 4 from before the resume
    best_iter = max(vals, key=lambda i: (vals[i], -i))  # the first of the best
    best, last = (torch.load(out / name, weights_only=True) for name in ("best.pth", "last.pth"))
    assert best["iteration"] == best_iter and best["miou"] == pytest.approx(vals[best_iter])
    assert last["best_miou"] == pytest.approx(max(vals.values())) and last["iteration"] == 8


def mmseg_convert(x, alpha=1.0, beta=0.0):
    """mmseg's PhotoMetricDistortion.convert, as written there: float32, scale and shift, clip, astype(np.uint8)."""
    return np.clip(np.asarray(x, np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def test_photometric_distortion_truncates_after_every_step_as_mmseg():
    grey = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    p = dict(brightness=10.7, contrast=1.37, contrast_first=True, saturation=None, hue=None)
    expected = mmseg_convert(mmseg_convert(100, beta=10.7), alpha=1.37)  # 110, then 150 (rounding once: 152)
    assert int(expected) == 150
    assert (carb.photometric_distortion(grey, p) == 150).all()
    p = dict(brightness=-120.0, contrast=0.5, contrast_first=False, saturation=None, hue=None)  # clipped, then scaled
    assert (carb.photometric_distortion(grey, p) == 0).all()
    p = dict(brightness=None, contrast=2.0, contrast_first=False, saturation=None, hue=None)
    assert (carb.photometric_distortion(torch.full((3, 1, 1), 200, dtype=torch.uint8), p) == 255).all()


def test_photometric_hue_is_an_integer_shift_in_opencv_units():
    # the draws: mmseg's numpy randint(-18, 18) (hue_delta 18, in 0-180 units), whose upper end is exclusive
    draws = [carb.photometric_params(torch.Generator().manual_seed(s))["hue"] for s in range(400)]
    draws = [d for d in draws if d is not None]
    assert 120 < len(draws) < 280 and set(draws) == set(range(-18, 18))
    # d = 18 units is 36 degrees: pure red becomes the colour of hue 36 degrees, by colorsys
    import colorsys
    red = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
    out = carb.photometric_distortion(red, dict(brightness=None, contrast=None, contrast_first=True, saturation=None,
                                                hue=18))
    assert out.flatten().tolist() == [round(255 * v) for v in colorsys.hsv_to_rgb(36 / 360, 1, 1)]  # 255, 153, 0


def test_photometric_params_follow_mmsegs_ranges_and_coins():
    ps = [carb.photometric_params(torch.Generator().manual_seed(s)) for s in range(400)]
    for key, lo, hi in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5)):
        values = [p[key] for p in ps if p[key] is not None]
        assert 120 < len(values) < 280 and lo <= min(values) and max(values) <= hi  # each step: probability 1/2
    assert 120 < sum(p["contrast_first"] for p in ps) < 280
    grey = torch.full((3, 4, 6), 128, dtype=torch.uint8)
    outs = [carb.photometric_distortion(grey, p) for p in ps[:20]]
    assert all(o.dtype == torch.uint8 for o in outs) and any(not torch.equal(o, grey) for o in outs)
