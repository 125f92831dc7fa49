"""carb.py -- Weakly Supervised Semantic Segmentation for Driving Scenes (CARB), in one file.

Kim, Lee, Choe, Shim, AAAI 2024 (arXiv 2312.13646); official code: github.com/k0u-id/CARB.

    python carb.py --data synthetic                                  # offline, CPU, a few minutes
    python carb.py --data cityscapes --data-root data/cityscapes     # the paper's setting, one GPU

The file reads like the paper:
  1. Data           image + image-level labels only (the GT masks are read once, to list the classes present)
  2. Pseudo-masks   MaskCLIP: CLIP ViT-B/16 labels every pixel with one of the image's classes
  3. Global-local   CLIP also labels an up-scaled window of the crop (recovers small objects)
  4. Model          torchvision DeepLabV3 whose classifier is CLIP's text embeddings
  5. CARB loss      consistency-aware region balancing (copy-paste block, torch only)
  6. Training       plain PyTorch loop, poly lr, validation mIoU and pictures, checkpoints
  7. main()
"""
import argparse
import hashlib
import math
import os
import pickle
import sys
import warnings
from glob import glob

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from torchvision.io import ImageReadMode, decode_image
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from tqdm import tqdm


class CarbError(Exception):
    """Bad input from the user: main() prints it as one line and exits with code 2."""


# ---------------------------------------------------------------------------------------------------
# 1. Data -- Cityscapes layout, image-level labels only
# ---------------------------------------------------------------------------------------------------

# The 19 evaluation classes and the labelId -> trainId map, from the table torchvision ships.
CITYSCAPES = [c for c in torchvision.datasets.Cityscapes.classes if not c.ignore_in_eval]
CLASS_NAMES = [c.name for c in CITYSCAPES]
PALETTE = [c.color for c in CITYSCAPES]
LABEL_TO_TRAIN = torch.full((256,), 255, dtype=torch.uint8)
TRAIN_TO_LABEL = torch.zeros(256, dtype=torch.uint8)  # and back; void (255) -> 0 "unlabeled", a miss when scored
for _c in CITYSCAPES:
    LABEL_TO_TRAIN[_c.id] = _c.train_id
    TRAIN_TO_LABEL[_c.train_id] = _c.id
# The names CARB gives CLIP for those classes ("tree" for vegetation, "pedestrian" for person, ...).
CLIP_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "tree",
              "grass", "sky", "pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the segmentation model's input
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's input


def normalize(images, mean, std):
    """[B,3,H,W] in [0,1] -> normalized; done on the device so the two models each get their own statistics."""
    return TF.normalize(images, list(mean), list(std))


def list_split(root, split):
    """The image and labelIds files of one split, in the standard Cityscapes layout."""
    img_dir = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(img_dir):
        raise CarbError(f"{img_dir} not found: --data-root must hold leftImg8bit/{split}/CITY/*_leftImg8bit.png "
                        f"and gtFine/{split}/CITY/*_gtFine_labelIds.png")
    images = sorted(glob(os.path.join(img_dir, "*", "*_leftImg8bit.png")))
    if not images:
        raise CarbError(f"{img_dir} holds no CITY/*_leftImg8bit.png images: check --data-root")
    gts = [p.replace(os.sep + "leftImg8bit" + os.sep, os.sep + "gtFine" + os.sep, 1)
           .replace("_leftImg8bit.png", "_gtFine_labelIds.png") for p in images]
    return images, gts


def image_id(path):
    """frankfurt_000000_000294 for .../frankfurt_000000_000294_leftImg8bit.png; other images: the file name's stem."""
    name = os.path.basename(path)
    return name[:-len("_leftImg8bit.png")] if name.endswith("_leftImg8bit.png") else os.path.splitext(name)[0]


def read_image(path):
    """uint8 [3,H,W]."""
    try:
        return decode_image(torchvision.io.read_file(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as e:
        raise CarbError(f"cannot read image {path} ({e}): re-extract or remove it") from None


def read_train_ids(path):
    """A *_gtFine_labelIds.png -> uint8 [H,W] of trainIds (255 = ignore)."""
    try:
        label_ids = torch.from_numpy(np.array(Image.open(path), dtype=np.uint8))
    except (OSError, ValueError) as e:
        raise CarbError(f"cannot read label {path} ({e}): re-extract or remove it") from None
    return LABEL_TO_TRAIN[label_ids.long()]


def image_level_labels(gt_paths, num_classes, cache_dir):
    """[N, C] uint8: which trainIds occur in each image. Computed once from the GT and cached; this is the only
    thing training ever takes from the GT masks (the weak supervision of the paper)."""
    key = hashlib.sha1("\n".join(os.path.abspath(p) for p in gt_paths).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"image_labels_{key}.pt")
    if os.path.isfile(cache):
        return torch.load(cache, weights_only=True)
    labels = torch.zeros(len(gt_paths), num_classes, dtype=torch.uint8)
    for i, p in enumerate(tqdm(gt_paths, desc="image-level labels", leave=False)):
        present = read_train_ids(p).unique().long()
        labels[i, present[present < num_classes]] = 1
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(labels, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return labels


def photometric_distortion(img, g):
    """mmseg's PhotoMetricDistortion on a float [3,H,W] image in [0,255]: each step with probability 1/2 --
    brightness +U(-32,32), contrast xU(0.5,1.5) (before or after the colour steps), saturation xU(0.5,1.5),
    hue +U(-18,18) of 180 degrees."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    coin = lambda: torch.rand((), generator=g).item() < 0.5  # noqa: E731
    if coin():
        img = (img + u(-32, 32)).clamp(0, 255)
    contrast_first = coin()
    if contrast_first and coin():
        img = (img * u(0.5, 1.5)).clamp(0, 255)
    if coin():
        img = TF.adjust_saturation(img / 255, u(0.5, 1.5)) * 255
    if coin():
        img = TF.adjust_hue(img / 255, u(-18, 18) / 180) * 255
    if not contrast_first and coin():
        img = (img * u(0.5, 1.5)).clamp(0, 255)
    return img


class WeakTrainSet(torch.utils.data.Dataset):
    """Training images with image-level labels only: yields (image uint8 [3,h,w], image_labels [C], valid_hw [2]).
    valid_hw is the size of the real image inside the padded crop (padding is bottom/right); never a mask.

    Augmentation as the official Cityscapes config: rescale to base_size x U(scale_range) (aspect kept),
    random crop, horizontal flip, photometric distortion, pad to the crop size. Randomness comes from
    (seed, sample number k), not from a worker's global state, so runs are reproducible and resumable."""

    def __init__(self, images, labels, crop, base_size, scale_range, seed, photometric=True):
        self.images, self.labels, self.seed, self.photometric = images, labels, seed, photometric
        self.crop, self.base_size, self.scale_range = crop, base_size, scale_range

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        k, i = item  # (global sample number, image index), from InfiniteSampler
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        img = read_image(self.images[i])
        # mmseg Resize(img_scale=(long, short), ratio_range, keep_ratio): fit the image inside the scaled base size
        lo, hi = self.scale_range
        r = lo + (hi - lo) * torch.rand((), generator=g).item()
        h, w = img.shape[-2:]
        s = min(r * max(self.base_size) / max(h, w), r * min(self.base_size) / min(h, w))
        img = TF.resize(img, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
        # random crop, flip, colour
        h, w = img.shape[-2:]
        ch, cw = min(self.crop[0], h), min(self.crop[1], w)
        top = torch.randint(0, h - ch + 1, (), generator=g).item()
        left = torch.randint(0, w - cw + 1, (), generator=g).item()
        img = img[:, top:top + ch, left:left + cw]
        if torch.rand((), generator=g).item() < 0.5:
            img = img.flip(-1)
        if self.photometric:
            img = photometric_distortion(img.float(), g).round().to(torch.uint8)
        img = F.pad(img, (0, self.crop[1] - cw, 0, self.crop[0] - ch))  # padded pixels are ignored by every loss
        return img, self.labels[i].float(), torch.tensor([ch, cw])


class InfiniteSampler(torch.utils.data.Sampler):
    """Yields (k, index) for k = start, start+1, ...: sample k is in epoch k // n of a seeded permutation.
    Batch t holds samples t*B .. t*B+B-1, so resuming at iteration t just starts at k = t*B."""

    def __init__(self, n, seed, start=0):
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self):
        k, perm = self.start, None
        while True:
            epoch, j = divmod(k, self.n)
            if j == 0 or perm is None:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            yield k, perm[j].item()
            k += 1


class EvalSet(torch.utils.data.Dataset):
    """Validation images at full resolution with their trainId masks: (image uint8 [3,H,W], mask uint8 [H,W])."""

    def __init__(self, images, gts):
        self.images, self.gts = images, gts

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, gt = read_image(self.images[i]), read_train_ids(self.gts[i])
        if img.shape[-2:] != gt.shape:
            raise CarbError(f"{self.gts[i]} is {tuple(gt.shape)} but its image is {tuple(img.shape[-2:])}")
        return img, gt


# Offline stand-in: procedural driving-like scenes written once in the Cityscapes layout, so the same loader
# reads them. Colours are the scene's, not the Cityscapes palette; each class has one base colour.
SYNTH_COLORS = {  # labelId: (name, RGB)
    7: ("road", (80, 80, 88)), 8: ("sidewalk", (175, 160, 150)), 11: ("building", (125, 95, 80)),
    17: ("pole", (45, 45, 40)), 19: ("traffic light", (240, 120, 30)), 20: ("traffic sign", (225, 215, 50)),
    21: ("vegetation", (60, 125, 45)), 23: ("sky", (130, 180, 235)), 24: ("person", (200, 50, 70)),
    26: ("car", (40, 60, 160)),
}


def render_scene(rng, height, width):
    """One synthetic street: (RGB uint8 [H,W,3], labelIds uint8 [H,W]). Sky, buildings and trees above the
    horizon, a road in perspective with sidewalks, cars, people, poles carrying traffic lights or signs."""
    H, W = height, width
    lab = np.full((H, W), 23, np.uint8)
    col = np.zeros((H, W, 3), np.float32)
    yy, xx = np.mgrid[0:H, 0:W]

    def paint(mask, label_id):
        lab[mask] = label_id
        col[mask] = np.array(SYNTH_COLORS[label_id][1]) + rng.normal(0, 12, 3)  # per-instance colour jitter

    paint(np.ones((H, W), bool), 23)
    horizon = int(H * rng.uniform(0.4, 0.55))
    x = 0
    while x < W:  # skyline: buildings and trees
        w = int(rng.integers(W // 12, W // 4))
        top = int(rng.integers(int(0.05 * H), horizon - H // 10))
        if rng.random() < 0.7:
            paint((yy >= top) & (yy < horizon) & (xx >= x) & (xx < x + w), 11)
        else:
            cy, ry = (top + horizon) / 2, (horizon - top) / 2 + 4
            paint(((yy - cy) / ry) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 < 1, 21)
        x += w
    below = yy >= horizon
    paint(below, 8)
    cx = W * rng.uniform(0.35, 0.65)
    half = W * 0.06 + (yy - horizon) / (H - horizon) * W * rng.uniform(0.45, 0.7)  # road widens towards the camera
    paint(below & (np.abs(xx - cx) < half), 7)
    depth = lambda y: 0.25 + 0.75 * (y - horizon) / (H - horizon)  # noqa: E731  (size ~ distance to horizon)
    for _ in range(int(rng.integers(1, 5))):  # cars on the road
        y = int(rng.uniform(horizon + 0.2 * (H - horizon), H - 2))
        s = depth(y)
        w, h = int(W * 0.22 * s), int(H * 0.17 * s)
        x0 = int(cx + rng.uniform(-1, 1) * max(half[y, 0] - w, 1) - w / 2)
        paint((yy <= y) & (yy > y - h) & (xx >= x0) & (xx < x0 + w), 26)
    for _ in range(int(rng.integers(0, 4))):  # people on the sidewalks
        y = int(rng.uniform(horizon + 0.1 * (H - horizon), H - 2))
        s = depth(y)
        w, h = max(2, int(W * 0.02 * s)), max(5, int(H * 0.12 * s))
        x0 = int(rng.uniform(0, W - w))
        paint((yy <= y) & (yy > y - h) & (xx >= x0) & (xx < x0 + w), 24)
    for _ in range(int(rng.integers(1, 4))):  # poles with a traffic light or a sign: the small objects
        y = int(rng.uniform(horizon + 0.05 * (H - horizon), horizon + 0.6 * (H - horizon)))
        s = depth(y)
        h, w = int(H * rng.uniform(0.3, 0.5) * s), max(2, int(W * 0.006))
        x0 = int(rng.uniform(0, W - 12))
        paint((yy <= y) & (yy > y - h) & (xx >= x0) & (xx < x0 + w), 17)
        top = y - h
        if rng.random() < 0.5:  # a traffic light: a small box on top of the pole
            bw, bh = max(3, int(W * 0.012)), max(6, int(H * 0.045))
            paint((yy <= top) & (yy > top - bh) & (xx >= x0 - bw // 3) & (xx < x0 - bw // 3 + bw), 19)
        else:  # a traffic sign: a small square
            b = max(5, int(W * 0.018))
            paint((yy <= top) & (yy > top - b) & (xx >= x0 - b // 3) & (xx < x0 - b // 3 + b), 20)
    col = col * rng.uniform(0.85, 1.15) + rng.normal(0, 8, (H, W, 3))  # illumination and sensor noise
    return np.clip(col, 0, 255).astype(np.uint8), lab


def make_synthetic(root, n_train, n_val, size, seed=0):
    """Write the synthetic dataset once (skipped when it is already complete)."""
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir, gt_dir = os.path.join(root, "leftImg8bit", split, "synth"), os.path.join(root, "gtFine", split, "synth")
        if len(glob(os.path.join(gt_dir, "*_labelIds.png"))) == n:
            continue
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        rng = np.random.default_rng([seed, split == "val"])
        for i in tqdm(range(n), desc=f"writing synthetic {split}", leave=False):
            rgb, lab = render_scene(rng, *size)
            name = f"synth_{i:06d}_000019"
            Image.fromarray(rgb).save(os.path.join(img_dir, name + "_leftImg8bit.png"))
            Image.fromarray(lab).save(os.path.join(gt_dir, name + "_gtFine_labelIds.png"))


# ---------------------------------------------------------------------------------------------------
# 2. CLIP pseudo-masks (MaskCLIP)
# ---------------------------------------------------------------------------------------------------

# CLIP's 80 ImageNet prompt templates plus the 5 scene templates MaskCLIP and CARB add.
TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
]


def load_clip(name_or_path, device):
    """clip.load with a clear error when the weights cannot be had (offline, typo, missing file)."""
    with warnings.catch_warnings():  # the clip package imports pkg_resources, which warns on import
        warnings.simplefilter("ignore")
        import clip
    if name_or_path not in clip.available_models() and not os.path.isfile(name_or_path):
        raise CarbError(f"--clip-model {name_or_path}: not a CLIP model name {clip.available_models()} "
                        "nor an existing file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation warning for the official .pt files
            model, _ = clip.load(name_or_path, device=device, jit=False)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # URLError is an OSError
        raise CarbError(f"--clip-model {name_or_path}: cannot load ({e}); offline, download the .pt elsewhere "
                        "and pass its path, e.g. --clip-model ~/.cache/clip/ViT-B-16.pt") from None
    return model.eval().requires_grad_(False)


@torch.no_grad()
def text_classifier(clip_model, class_names, cache_file=None):
    """[C, D] CLIP text embeddings: each name in the 85 templates, L2-normalized, averaged, re-normalized."""
    if cache_file and os.path.isfile(cache_file):
        return torch.load(cache_file, weights_only=True)
    import clip
    device = clip_model.token_embedding.weight.device
    rows = []
    for name in class_names:
        e = clip_model.encode_text(clip.tokenize([t.format(name) for t in TEMPLATES]).to(device)).float()
        e = F.normalize(e, dim=-1).mean(0)
        rows.append(F.normalize(e, dim=-1))
    classifier = torch.stack(rows).cpu()
    if cache_file:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        torch.save(classifier, cache_file + ".tmp")
        os.replace(cache_file + ".tmp", cache_file)
    return classifier


@torch.inference_mode()
def maskclip_scores(clip_model, images, text_classifier):
    """MaskCLIP dense scores: images [B,3,H,W], CLIP-normalized -> cosine similarities [B,C,H/16,W/16].

    The ViT runs as trained, with its positional embedding resized (bicubic) to the input's patch grid. In the
    last block only the value path is used -- x + out_proj(v_proj(ln_1(x))), then the MLP -- which keeps each
    patch's own content instead of the attention's global mixing; then ln_post and the visual projection."""
    vit = clip_model.visual
    p = vit.conv1.kernel_size[0]
    H, W = images.shape[-2:]
    gh, gw = max(1, int(H / p + 0.5)), max(1, int(W / p + 0.5))  # nearest whole number of patches
    if (H, W) != (gh * p, gw * p):  # e.g. the up-scaled window: resize to whole patches, keep the border
        images = F.interpolate(images, size=(gh * p, gw * p), mode="bilinear", align_corners=False)
    x = vit.conv1(images.to(vit.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, width]
    cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    pos = vit.positional_embedding.to(x.dtype)
    n = round(math.sqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False).to(x.dtype)
    x = torch.cat([cls, x], 1) + torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]])[None]
    x = vit.ln_pre(x).permute(1, 0, 2)  # [N+1, B, width], as CLIP's transformer expects
    *blocks, last = vit.transformer.resblocks
    for block in blocks:
        x = block(x)
    d = x.shape[-1]
    v = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * d:], last.attn.in_proj_bias[2 * d:])
    x = x + last.attn.out_proj(v)
    x = x + last.mlp(last.ln_2(x))
    x = vit.ln_post(x[1:].permute(1, 0, 2)) @ vit.proj  # patches only: [B, N, D]
    x = F.normalize(x.float(), dim=-1)
    scores = x @ text_classifier.to(x.device, torch.float32).t()  # [B, N, C]
    return scores.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)


def pseudo_mask(scores, image_labels, size):
    """scores [B,C,h,w] -> [B,H,W] long: bilinear upsampling, then argmax over each image's labelled classes only.
    Absent classes can never win; an image without labels is all ignore (255)."""
    scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
    scores = scores.masked_fill(image_labels[:, :, None, None] == 0, float("-inf"))
    mask = scores.argmax(1)
    mask[image_labels.sum(1) == 0] = 255
    return mask


class SimulatedCLIP(nn.Module):
    """The offline stand-in for MaskCLIP on the synthetic scenes, with the same call: CLIP-normalized images
    [B,3,H,W] -> scores [B,C,H/16,W/16]. A fixed, non-learned classifier that sees only pixels, never GT:

      * every pixel votes softly for the class whose scene colour is nearest; a 16x16 patch's score is its share
        of the votes. Like ViT-B/16's patches, an object much smaller than a patch is outvoted by its
        background -- the paper's small-object failure, which an up-scaled window partly repairs;
      * plus blob noise: the image's fine texture (pixels minus their local mean) through a fixed random
        projection, pooled to the patch grid and blurred -- spatially coherent errors that differ from image to
        image, like CLIP's noisy activations.
    It also provides the fixed "text classifier" (random orthonormal rows) that the segmentation model uses."""

    def __init__(self, noise=0.2, dim=512, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        colors = [SYNTH_COLORS[c.id][1] if c.id in SYNTH_COLORS else c.color for c in CITYSCAPES]
        self.register_buffer("colors", torch.tensor(colors, dtype=torch.float32) / 255)  # [C, 3]
        self.register_buffer("projection", torch.randn(len(colors), 3, 1, 1, generator=g))
        self.register_buffer("text_classifier", torch.linalg.qr(torch.randn(dim, len(colors), generator=g))[0].t())
        self.noise, self.temperature, self.patch = noise, 0.01, 16

    @torch.inference_mode()
    def forward(self, images):
        H, W = images.shape[-2:]
        gh, gw = max(1, int(H / self.patch + 0.5)), max(1, int(W / self.patch + 0.5))
        images = F.interpolate(images.float(), size=(gh * self.patch, gw * self.patch), mode="bilinear")
        rgb = images * torch.tensor(CLIP_STD, device=images.device)[:, None, None] \
            + torch.tensor(CLIP_MEAN, device=images.device)[:, None, None]
        dist2 = ((rgb[:, None] - self.colors[None, :, :, None, None]) ** 2).sum(2)  # [B, C, H, W]
        share = F.avg_pool2d(torch.softmax(-dist2 / self.temperature, 1), self.patch)
        texture = rgb - F.avg_pool2d(rgb, 5, 1, 2, count_include_pad=False)
        blobs = F.avg_pool2d(F.conv2d(texture, self.projection), self.patch)
        blobs = TF.gaussian_blur(blobs, kernel_size=5, sigma=1.5)
        blobs = (blobs - blobs.mean((2, 3), keepdim=True)) / (blobs.std((2, 3), keepdim=True) + 1e-6)
        return share + self.noise * blobs


# ---------------------------------------------------------------------------------------------------
# 3. Global-Local View Training
# ---------------------------------------------------------------------------------------------------

def sample_window(crop, window, rate, offset, g):
    """One window per batch, placed uniformly inside the crop, and its CLIP multiplier m = rate * U[0,1) + offset.
    Returns (top, left, height, width, m)."""
    h, w = min(window[0], crop[0]), min(window[1], crop[1])
    top = torch.randint(0, crop[0] - h + 1, (), generator=g).item()
    left = torch.randint(0, crop[1] - w + 1, (), generator=g).item()
    m = rate * torch.rand((), generator=g).item() + offset
    return top, left, h, w, m


def local_pseudo_mask(scorer, clip_images, image_labels, window):
    """CLIP on the window up-scaled by m; its scores come back to the window's size: the local pseudo-mask.
    At m > 1 a small object covers more of CLIP's 16x16 patches, so it survives the patch vote."""
    top, left, h, w, m = window
    patch = clip_images[:, :, top:top + h, left:left + w]
    patch = F.interpolate(patch, size=(int(h * m), int(w * m)), mode="bilinear", align_corners=False)
    return pseudo_mask(scorer(patch), image_labels, (h, w))


# ---------------------------------------------------------------------------------------------------
# 4. Model: torchvision DeepLabV3, classified by CLIP's text embeddings
# ---------------------------------------------------------------------------------------------------

def deeplabv3_mobilenet_stride8(weights=None, weights_backbone=None, num_classes=21, aux_loss=False):
    """The synthetic default: DeepLabV3's head on MobileNetV3-Large cut after its stride-8 stage (first 7 blocks,
    40 channels). torchvision's DeepLabV3-MobileNetV3 predicts at stride 16, as coarse as CLIP's patches, so it
    cannot sharpen CLIP's blocky masks; at stride 8 the model is finer than CLIP, as the paper's ResNet-50 is,
    and costs half as much on a CPU. Same signature as torchvision's builders (weights: backbone only)."""
    features = torchvision.models.mobilenet_v3_large(weights=weights_backbone).features[:7]
    backbone = create_feature_extractor(features, {"6": "out"})
    return torchvision.models.segmentation.DeepLabV3(backbone, DeepLabHead(40, num_classes))


BACKBONES = {
    "resnet50": (torchvision.models.segmentation.deeplabv3_resnet50, torchvision.models.ResNet50_Weights),
    "resnet101": (torchvision.models.segmentation.deeplabv3_resnet101, torchvision.models.ResNet101_Weights),
    "mobilenet_v3_large": (torchvision.models.segmentation.deeplabv3_mobilenet_v3_large,
                           torchvision.models.MobileNet_V3_Large_Weights),
    "mobilenet_v3_stride8": (deeplabv3_mobilenet_stride8, torchvision.models.MobileNet_V3_Large_Weights),
}


class Segmenter(nn.Module):
    """DeepLabV3 whose last 1x1 conv outputs CLIP's embedding dimension; the logits are the dot product of that
    embedding with the fixed text classifier (a buffer: saved with the model, never trained), as MaskCLIP+."""

    def __init__(self, backbone, text_classifier, backbone_weights="none"):
        super().__init__()
        build, weights_enum = BACKBONES[backbone]
        weights = None if backbone_weights == "none" else weights_enum.verify(backbone_weights)
        try:
            self.net = build(weights=None, weights_backbone=weights, num_classes=text_classifier.shape[1],
                             aux_loss=False)
        except OSError as e:  # offline: torchvision could not download the ImageNet weights
            raise CarbError(f"--backbone-weights {backbone_weights}: cannot download {weights.url} ({e}); "
                            "put that file in $TORCH_HOME/hub/checkpoints (default ~/.cache/torch) "
                            "or pass --backbone-weights none") from None
        self.register_buffer("text_classifier", text_classifier.float().clone())
        for m in self.modules():  # MobileNetV3's BN momentum 0.01 suits long ImageNet runs; short runs need the
            if isinstance(m, nn.BatchNorm2d):  # PyTorch default 0.1 (ResNet's already) for usable eval statistics
                m.momentum = 0.1

    def forward(self, images):
        embedding = self.net.classifier(self.net.backbone(images)["out"])  # [B, D, H/8, W/8]
        logits = torch.einsum("bdhw,cd->bchw", embedding, self.text_classifier.to(embedding.dtype))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------
# 5. CARB loss: Consistency-Aware Region Balancing. Self-contained: copy this block; it needs only torch.
# ---------------------------------------------------------------------------------------------------

def masked_cross_entropy(logits, target, region=None, ignore_index=255):
    """Mean cross-entropy over the pixels of `region` (default: all non-ignored); 0, never NaN, if it is empty."""
    ce = torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    region = (target != ignore_index) if region is None else region
    return (ce * region).sum() / region.sum().clamp(min=1)


def carb_loss(logits, pseudo_mask, image_labels, weight):
    """logits [B,C,H,W]; pseudo_mask [B,H,W] (255 = ignore); image_labels [B,C] in {0,1}.

    prediction   P = argmax of the logits over each image's labelled classes
    consistent   R_c = {pixels: pseudo_mask == P}, inconsistent R_i = the other non-ignored pixels
    loss         L = CE(R_c) + w * CE(R_i)      (CE = mean cross-entropy over the region, 0 if empty)
    `weight` is a float or a callable w(CE(R_c), CE(R_i)) -- e.g. a RegionBalancer -- called with this call's
    detached values, so the current iteration counts. Returns (L, CE(R_c).detach(), CE(R_i).detach())."""
    with torch.no_grad():
        absent = image_labels[:, :, None, None] == 0
        prediction = logits.detach().masked_fill(absent, float("-inf")).argmax(1)
        valid = pseudo_mask != 255
        consistent = valid & (pseudo_mask == prediction)
        inconsistent = valid & ~consistent
    consistent_ce = masked_cross_entropy(logits, pseudo_mask, consistent)
    inconsistent_ce = masked_cross_entropy(logits, pseudo_mask, inconsistent)
    if callable(weight):
        weight = weight(consistent_ce.detach(), inconsistent_ce.detach())
    loss = consistent_ce + weight * inconsistent_ce
    return loss, consistent_ce.detach(), inconsistent_ce.detach()


class RegionBalancer:
    """Adaptive region weight: w = coeff * mean(last `window` CE(R_c)) / mean(last `window` CE(R_i)).
    The disagreeing region is scaled down as much as it is harder than the agreeing one. If every stored
    inconsistent CE is 0 there is nothing to balance and w = coeff."""

    def __init__(self, coeff=1.0, window=5):
        self.coeff, self.window, self.weight = coeff, window, coeff
        self.consistent, self.inconsistent = [], []

    def __call__(self, consistent_ce, inconsistent_ce):
        self.consistent = (self.consistent + [float(consistent_ce)])[-self.window:]
        self.inconsistent = (self.inconsistent + [float(inconsistent_ce)])[-self.window:]
        mean_c = sum(self.consistent) / len(self.consistent)
        mean_i = sum(self.inconsistent) / len(self.inconsistent)
        self.weight = self.coeff * mean_c / mean_i if mean_i > 0 else self.coeff
        return self.weight

    def state_dict(self):
        return {"coeff": self.coeff, "window": self.window, "weight": self.weight,
                "consistent": list(self.consistent), "inconsistent": list(self.inconsistent)}

    def load_state_dict(self, state):
        self.__dict__.update(state)

# ---------------------------------------------------------------------------------------------------- end of block


# ---------------------------------------------------------------------------------------------------
# 6. Training loop and evaluation
# ---------------------------------------------------------------------------------------------------

def poly_lr(it, iters, base_lr, min_lr, power=0.9):
    """mmcv's poly schedule with a floor: (base - min) * (1 - it/iters)^power + min."""
    return (base_lr - min_lr) * (1 - it / iters) ** power + min_lr


def train_one_step(model, scorer, batch, window, carb_on, balancer, device):
    """One CARB iteration (forward and loss). Returns the loss and the terms to log."""
    images, image_labels, valid_hw = (t.to(device, non_blocking=True) for t in batch)
    x = images.float() / 255
    rows, cols = torch.arange(x.shape[-2], device=device), torch.arange(x.shape[-1], device=device)
    padded = (rows[None, :, None] >= valid_hw[:, 0, None, None]) | (cols[None, None, :] >= valid_hw[:, 1, None, None])

    # pseudo-masks: CLIP on the whole crop (global) and on the up-scaled window (local)
    clip_x = normalize(x, CLIP_MEAN, CLIP_STD)
    global_mask = pseudo_mask(scorer(clip_x), image_labels, x.shape[-2:]).masked_fill(padded, 255)
    top, left, h, w, _ = window
    local_mask = local_pseudo_mask(scorer, clip_x, image_labels, window)
    local_mask = local_mask.masked_fill(padded[:, top:top + h, left:left + w], 255)

    seg_x = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    if device.type == "cuda":
        seg_x = seg_x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(seg_x)
    local_logits = logits[:, :, top:top + h, left:left + w]

    if not carb_on:  # warm-up: plain cross-entropy on both views
        loss_g, loss_l = masked_cross_entropy(logits, global_mask), masked_cross_entropy(local_logits, local_mask)
        return loss_g + loss_l, {"global": loss_g.item(), "local": loss_l.item()}
    loss_g, ce_c, ce_i = carb_loss(logits, global_mask, image_labels, balancer)  # feeds the balancer
    loss_l, _, _ = carb_loss(local_logits, local_mask, image_labels, balancer.weight)
    return loss_g + loss_l, {"global": loss_g.item(), "local": loss_l.item(), "ce_c": ce_c.item(),
                             "ce_i": ce_i.item(), "w": balancer.weight}


@torch.no_grad()
def predict(model, images, scales=(1.0,), flip=False):
    """uint8 images [B,3,H,W] -> trainIds [B,H,W]: the whole image at full resolution, as the official test config.
    Several scales and/or flip (test-time augmentation): the softmax is averaged over the views, each resized back
    to the image first, as mmseg's aug_test."""
    x = normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    H, W = x.shape[-2:]
    probs = 0
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, size=(round(H * s), round(W * s)), mode="bilinear", align_corners=False)
        for flipped in (False, True)[:1 + flip]:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                logits = model(xs.flip(-1) if flipped else xs)
            logits = F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False)
            probs = probs + (logits.flip(-1) if flipped else logits).softmax(1)
    return probs.argmax(1)


def confusion_matrix(pred, gt, num_classes):
    """[C, C+1] counts, rows = ground truth, columns = prediction. Pixels with gt 255 are skipped; the last column
    counts void predictions (255, or any id >= C): a miss for the GT class, a false positive for none, as a
    prediction of an ignored labelId is in the official Cityscapes evaluation."""
    keep = gt != 255
    idx = gt[keep].long() * (num_classes + 1) + pred[keep].long().clamp(0, num_classes)
    return torch.bincount(idx, minlength=num_classes * (num_classes + 1)).reshape(num_classes, num_classes + 1)


def iou_from_confusion(conf):
    """Per-class IoU = tp / (tp + fp + fn) from a [C, C] or [C, C+1] confusion matrix (rows = GT, with void
    predictions in the extra column); NaN for a class with neither GT nor predicted pixels."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf[:, :len(tp)].sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(iou):
    """Mean over the classes that occur (NaN entries left out), in percent."""
    return 100 * iou[~iou.isnan()].mean().item()


def present_classes(gt, num_classes):
    """trainId mask [H,W] -> [C] float, 1 for each class in it: the image-level labels of one image."""
    return (torch.bincount(gt[gt != 255].long(), minlength=num_classes)[:num_classes] > 0).float()


@torch.no_grad()
def evaluate(model, loader, num_classes, device, desc="val"):
    """Whole-image inference at full resolution; the confusion matrix is summed on the device. Returns IoUs."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes + 1, dtype=torch.long, device=device)
    for images, gts in tqdm(loader, desc=desc, leave=False):
        conf += confusion_matrix(predict(model, images.to(device)), gts.to(device), num_classes)
    model.train()
    return iou_from_confusion(conf)


@torch.no_grad()
def evaluate_pseudo_masks(scorer, loader, num_classes, device):
    """IoU of CLIP's global pseudo-masks on a split, restricted to each image's GT image-level labels."""
    conf = torch.zeros(num_classes, num_classes + 1, dtype=torch.long, device=device)
    for images, gts in tqdm(loader, desc="pseudo-masks", leave=False):
        gts = gts.to(device)
        labels = torch.stack([present_classes(g, num_classes) for g in gts])
        clip_x = normalize(images.to(device).float() / 255, CLIP_MEAN, CLIP_STD)
        conf += confusion_matrix(pseudo_mask(scorer(clip_x), labels, gts.shape[-2:]), gts, num_classes)
    return iou_from_confusion(conf)


# Pictures: image | masks side by side, in the Cityscapes palette (void black), titled, with a legend below.
VIS_TITLE_H, VIS_LEGEND_H, VIS_LEGEND_W, VIS_MAX_W = 16, 16, 112, 1024  # pixels


def colorize(mask):
    """trainId mask [H,W] -> RGB uint8 [H,W,3] in the Cityscapes palette; void (255) black."""
    lut = torch.zeros(256, 3, dtype=torch.uint8)
    lut[:len(PALETTE)] = torch.tensor(PALETTE, dtype=torch.uint8)
    return lut[mask.cpu().long()]


def vis_strip(image, masks):
    """One picture per image: the image (uint8 [3,H,W]), then each trainId mask [H,W] of `masks` ({title: mask}),
    side by side under their titles, then a legend of the classes present. Panels wider than VIS_MAX_W are shrunk
    to it (a Cityscapes strip at full resolution would be 8192 px wide)."""
    H, W = image.shape[-2:]
    w, h = min(W, VIS_MAX_W), round(H * min(W, VIS_MAX_W) / W)
    panels = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((w, h), Image.BILINEAR)]
    panels += [Image.fromarray(colorize(m).numpy()).resize((w, h), Image.NEAREST) for m in masks.values()]
    present = sorted({c for m in masks.values() for c in m.unique().tolist() if c < len(CLASS_NAMES)})
    per_row = max(1, len(panels) * w // VIS_LEGEND_W)
    strip = Image.new("RGB", (len(panels) * w, VIS_TITLE_H + h + math.ceil(len(present) / per_row) * VIS_LEGEND_H),
                      "white")
    draw = ImageDraw.Draw(strip)  # PIL's default font: no font file to ship
    for k, (title, panel) in enumerate(zip(["image", *masks], panels)):
        strip.paste(panel, (k * w, VIS_TITLE_H))
        draw.text((k * w + 3, 2), title, fill="black")
    for n, c in enumerate(present):
        x, y = n % per_row * VIS_LEGEND_W, VIS_TITLE_H + h + n // per_row * VIS_LEGEND_H
        draw.rectangle((x + 3, y + 3, x + 13, y + 13), fill=PALETTE[c], outline="black")
        draw.text((x + 17, y + 2), CLASS_NAMES[c], fill="black")
    return strip


@torch.no_grad()
def write_val_strips(model, scorer, dataset, out_dir, device, n=4):
    """The pictures of a validation: image | CLIP pseudo-mask | prediction | GT, for n fixed val images
    (spread over the split), as out_dir/IMAGE_ID.png."""
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    for i in range(0, len(dataset), max(1, len(dataset) // n))[:n]:
        image, gt = dataset[i]
        x = image[None].to(device)
        labels = present_classes(gt, len(CLASS_NAMES))[None].to(device)
        clip_mask = pseudo_mask(scorer(normalize(x.float() / 255, CLIP_MEAN, CLIP_STD)), labels, gt.shape)[0]
        strip = vis_strip(image, {"CLIP pseudo-mask": clip_mask, "prediction": predict(model, x)[0], "GT": gt})
        strip.save(os.path.join(out_dir, image_id(dataset.images[i]) + ".png"))
    model.train()


def format_table(columns, class_names):
    """Aligned per-class IoU table; columns = {title: iou tensor}."""
    widths = [max(14, len(t) + 2) for t in columns]
    lines = [f"{'class':<15}" + "".join(f"{t:>{n}}" for t, n in zip(columns, widths))]
    for i, name in enumerate(class_names):
        vals = [c[i].item() for c in columns.values()]
        if all(math.isnan(v) for v in vals):
            continue
        lines.append(f"{name:<15}" + "".join(f"{'-' if math.isnan(v) else f'{100 * v:.2f}':>{n}}"
                                             for v, n in zip(vals, widths)))
    lines.append(f"{'mIoU':<15}" + "".join(f"{mean_iou(c):>{n}.2f}" for c, n in zip(columns.values(), widths)))
    return "\n".join(lines)


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: `path` is always a whole checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------
# 7. main
# ---------------------------------------------------------------------------------------------------

# Per-dataset defaults. Cityscapes: the official configs/carb/cityscapes_carb_dual.py (2 GPUs x 4 images there;
# batch 8 on one GPU here). Synthetic: small enough to train on 2 CPU cores in a few minutes.
DEFAULTS = {
    "cityscapes": dict(data_root="data/cityscapes", out="runs/cityscapes", iters=30000, batch_size=8,
                       crop=(512, 1024), base_size=(1024, 2048), scale_range=(0.5, 2.0), window=(512, 256),
                       multiplier=(1.0, 1.0), carb_start=16000, optimizer="sgd", lr=0.005, min_lr=1e-4, backbone="resnet50",
                       backbone_weights="IMAGENET1K_V1", clip_model="ViT-B/16", val_every=2000, workers=4,
                       photometric=True),
    "synthetic": dict(data_root="data/synthetic", out="runs/synthetic", iters=400, batch_size=4,
                      crop=(128, 256), base_size=(256, 512), scale_range=(0.5, 2.0), window=(128, 64),
                      multiplier=(1.0, 1.0), carb_start=213, optimizer="adamw", lr=2e-3, min_lr=1e-5,
                      backbone="mobilenet_v3_stride8",
                      backbone_weights="none", clip_model="simulated", val_every=200, workers=1,
                      photometric=False),
}
SYNTHETIC_SIZES = dict(n_train=300, n_val=40)


def get_args_parser():
    p = argparse.ArgumentParser(description="CARB: weakly supervised semantic segmentation for driving scenes.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = lambda key: "default: " + "; ".join(f"{n} {DEFAULTS[n][key]}" for n in DEFAULTS)  # noqa: E731
    p.add_argument("--data", choices=list(DEFAULTS), default="synthetic", help="dataset")
    p.add_argument("--data-root", help=d("data_root"))
    p.add_argument("--out", help="run folder for last.pth, best.pth; " + d("out"))
    p.add_argument("--iters", type=int, help=d("iters"))
    p.add_argument("--batch-size", type=int, help=d("batch_size"))
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help=d("crop"))
    p.add_argument("--scale-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="random rescale of the base size; " + d("scale_range"))
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"), help="global-local window; " + d("window"))
    p.add_argument("--multiplier", type=float, nargs=2, metavar=("RATE", "OFFSET"),
                   help="window up-scaling m = RATE * U[0,1) + OFFSET; " + d("multiplier"))
    p.add_argument("--photometric", action=argparse.BooleanOptionalAction,
                   help="mmseg's PhotoMetricDistortion; " + d("photometric"))
    p.add_argument("--carb-start", type=int, help="iteration at which CARB replaces plain CE; " + d("carb_start"))
    p.add_argument("--region-weight", default="adaptive",
                   help="'adaptive' (RegionBalancer, coeff 1, window 5) or a fixed float, e.g. 0.03")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help=d("optimizer"))
    p.add_argument("--lr", type=float, help=d("lr"))
    p.add_argument("--min-lr", type=float, help=d("min_lr"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clip-model", metavar="NAME_OR_PATH",
                   help="clip.load name or local .pt; 'simulated' = the synthetic stand-in; " + d("clip_model"))
    p.add_argument("--backbone", choices=list(BACKBONES), help=d("backbone"))
    p.add_argument("--backbone-weights", help="torchvision weights name or 'none'; " + d("backbone_weights"))
    p.add_argument("--val-every", type=int, help=d("val_every"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help=d("workers"))
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "carb"),
                   help="image-level labels and CLIP text embeddings are cached here")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pth")
    return p


def parse_args(argv=None):
    args = get_args_parser().parse_args(argv)
    for key, value in DEFAULTS[args.data].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def check_args(args):
    if args.iters < 1 or args.batch_size < 1 or args.val_every < 1:
        raise CarbError("--iters, --batch-size and --val-every must be at least 1")
    if min(args.crop) < 16 or min(args.window) < 16:
        raise CarbError("--crop and --window sides must be at least 16 (one CLIP patch)")
    if args.region_weight != "adaptive":
        try:
            float(args.region_weight)
        except ValueError:
            raise CarbError(f"--region-weight {args.region_weight}: use 'adaptive' or a number") from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CarbError(f"--out {args.out} is a file: pass a folder")
    if args.resume and not os.path.isfile(os.path.join(args.out, "last.pth")):
        raise CarbError(f"--resume: {os.path.join(args.out, 'last.pth')} not found; "
                        f"drop --resume to start a new run in {args.out}")


def build_scorer(args, device):
    """(scorer, text_classifier): scorer maps CLIP-normalized images to stride-16 class scores."""
    if args.clip_model == "simulated":
        sim = SimulatedCLIP().to(device)
        return sim, sim.text_classifier.cpu()
    clip_model = load_clip(args.clip_model, device)
    key = hashlib.sha1(repr((os.path.abspath(args.clip_model) if os.path.isfile(args.clip_model)
                             else args.clip_model, CLIP_NAMES, TEMPLATES)).encode()).hexdigest()[:16]
    classifier = text_classifier(clip_model, CLIP_NAMES, os.path.join(args.cache_dir, f"text_{key}.pt"))
    return (lambda images: maskclip_scores(clip_model, images, classifier)), classifier


def main(args):
    check_args(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.data == "synthetic":
        make_synthetic(args.data_root, size=DEFAULTS["synthetic"]["base_size"], **SYNTHETIC_SIZES)
    num_classes = len(CLASS_NAMES)

    train_images, train_gts = list_split(args.data_root, "train")
    image_labels = image_level_labels(train_gts, num_classes, args.cache_dir)  # the only use of train GT
    train_set = WeakTrainSet(train_images, image_labels, args.crop, args.base_size, args.scale_range, args.seed,
                             args.photometric)
    val_set = EvalSet(*list_split(args.data_root, "val"))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=1, num_workers=args.workers)

    scorer, classifier = build_scorer(args, device)
    model = Segmenter(args.backbone, classifier, args.backbone_weights).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.optimizer == "sgd":  # the official schedule
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    else:  # synthetic default: a from-scratch backbone learns several times faster with AdamW in a short run
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    balancer = RegionBalancer() if args.region_weight == "adaptive" else None
    region_weight = balancer if balancer else float(args.region_weight)

    os.makedirs(args.out, exist_ok=True)
    last, best_path = os.path.join(args.out, "last.pth"), os.path.join(args.out, "best.pth")
    start, best = 0, -1.0
    if args.resume:
        ckpt = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if balancer:
            balancer.load_state_dict(ckpt["balancer"])
        torch.set_rng_state(ckpt["rng"])
        start, best = ckpt["iteration"], ckpt["best_miou"]

    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, sampler=InfiniteSampler(len(train_set), args.seed, start * args.batch_size),
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    batches = iter(loader)
    model.train()
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc="train", dynamic_ncols=True)
    for it in bar:
        lr = poly_lr(it, args.iters, args.lr, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        window = sample_window(args.crop, args.window, *args.multiplier,
                               torch.Generator().manual_seed(args.seed * 1_000_003 + it))
        carb_on = it >= args.carb_start
        weight = (balancer or region_weight) if carb_on else None
        loss, logs = train_one_step(model, scorer, next(batches), window, carb_on, weight, device)
        if not math.isfinite(loss.item()):
            raise CarbError(f"non-finite loss at iteration {it}: {logs}; {last} was not overwritten")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if carb_on and not balancer:
            logs["w"] = region_weight
        bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()} | {"lr": f"{lr:.2e}"})

        if (it + 1) % args.val_every == 0 or it + 1 == args.iters:
            miou = mean_iou(evaluate(model, val_loader, num_classes, device))
            tqdm.write(f"iter {it + 1}: val mIoU {miou:.2f}")
            write_val_strips(model, scorer, val_set, os.path.join(args.out, "vis", str(it + 1)), device)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it + 1,
                     "balancer": balancer.state_dict() if balancer else None, "rng": torch.get_rng_state(),
                     "best_miou": max(best, miou), "miou": miou, "args": vars(args)}
            save_checkpoint(state, last)
            if miou > best:
                best = miou
                save_checkpoint(state, best_path)
    bar.close()

    # The paper's two numbers on the val split: CLIP's pseudo-masks and the trained model.
    pseudo_iou = evaluate_pseudo_masks(scorer, val_loader, num_classes, device)
    model_iou = evaluate(model, val_loader, num_classes, device)
    print(format_table({"pseudo-mask": pseudo_iou, "model": model_iou}, CLASS_NAMES))
    if args.data == "synthetic":
        print("(synthetic stand-in data and a simulated CLIP: these are not Cityscapes results)")
    print(f"pseudo-mask mIoU: {mean_iou(pseudo_iou):.2f}")
    print(f"model mIoU: {mean_iou(model_iou):.2f}")
    return model_iou


def run(argv=None):
    try:
        main(parse_args(argv))
    except CarbError as e:
        print(f"carb.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
