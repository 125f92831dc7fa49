"""carb.py -- Weakly Supervised Semantic Segmentation for Driving Scenes (CARB: Kim, Lee, Choe, Shim, AAAI 2024,
arXiv 2312.13646; official code github.com/k0u-id/CARB) in one file. Run `python carb.py --data synthetic`.
The method comes first, in the paper's order (1. CLIP pseudo-masks, 2. Global-Local View, 3. the model, 4. the CARB
loss, 5. one training step); then 6. data, 7. the training loop, 8. validation, 9. the command line, and an appendix."""
import argparse
import collections
import contextlib
import csv
import functools
import itertools
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import re
import shlex
import signal
import sys
import time
import warnings
from glob import glob

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from tqdm import tqdm

class CarbError(Exception):
    """Bad input from the user: run() prints it as one line and exits with code 2."""
    def __str__(self):  # raised in a DataLoader worker, it comes back with the worker's traceback above its line
        return super().__str__().rstrip().splitlines()[-1].split("CarbError: ", 1)[-1]

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # CLIP's input
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the segmentation model's input

# 1. CLIP pseudo-masks (MaskCLIP) -------------------------------------------------------------------
# CLIP's 80 ImageNet prompt templates plus the 5 scene templates MaskCLIP and CARB add.
TEMPLATES = ["a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.", "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene."]

def load_clip(name_or_path, device):
    """clip.load by name (to ~/.cache/clip) or file (.pt or state dict): frozen, eval, fp32 (it gives fp16 on CUDA)."""
    with warnings.catch_warnings():  # clip imports pkg_resources, and torch.jit.load is deprecated: both warn
        warnings.simplefilter("ignore")
        import clip
        try:  # unknown names, offline downloads: RuntimeError, URLError (an OSError); bad files: the others
            return clip.load(name_or_path, device=device, jit=False)[0].float().eval().requires_grad_(False)
        except Exception as e:  # noqa: BLE001  (whatever it is, this file or name is not a CLIP model)
            raise CarbError(f"--clip-model {name_or_path}: cannot load it ({type(e).__name__}: {str(e)[:80]}); pass "
                            f"one of {clip.available_models()}, or (offline) pass its path: OpenAI's .pt file "
                            "(e.g. ~/.cache/clip/ViT-B-16.pt) or a CLIP state dict") from None

@torch.no_grad()
def text_classifier(clip_model, class_names):
    """[C, D] CLIP text embeddings: each name in the 85 templates, L2-normalized, averaged, re-normalized."""
    import clip
    tokens = clip.tokenize([t.format(name) for name in class_names for t in TEMPLATES])
    e = clip_model.encode_text(tokens.to(clip_model.token_embedding.weight.device)).float()
    return F.normalize(F.normalize(e, dim=-1).reshape(len(class_names), len(TEMPLATES), -1).mean(1), dim=-1).cpu()

DENSE_CLIP = ["maskclip", "sclip", "clearclip", "naclip"]  # last-block variants of maskclip_scores

@functools.lru_cache(maxsize=16)
def neighbourhood(gh, gw, device="cpu", sigma=5.0):
    """NACLIP's bias [N+1, N+1], once per grid and device: Omega_ij = exp(-|p_i - p_j|^2 / 2 sigma^2), 0 for CLS."""
    grid = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(-1, 2).float()
    return F.pad(torch.exp(-torch.cdist(grid, grid) ** 2 / (2 * sigma ** 2)), (1, 0, 1, 0)).to(device)

@torch.inference_mode()
def maskclip_scores(clip_model, images, text_classifier, variant="maskclip"):
    """Dense CLIP scores: images [B,3,H,W], CLIP-normalized -> cosine similarities [B,C,H/16,W/16].
    The ViT runs as trained, its positional embedding resized (bicubic) to the input's patch grid, up to its last
    block. There MaskCLIP (CARB's) keeps the value path alone, so each patch keeps its own content: with x the tokens
    (CLS first) and v = the value projection of ln_1(x), y = x + out_proj(v); y = y + mlp(ln_2(y)). Each patch then
    goes through ln_post and the visual projection, as CLIP's class token does. Other variants: `dense_clip_block`."""
    vit = clip_model.visual
    p = vit.conv1.kernel_size[0]
    H, W = images.shape[-2:]
    gh, gw = max(1, int(H / p + 0.5)), max(1, int(W / p + 0.5))  # nearest whole number of patches
    if (H, W) != (gh * p, gw * p):  # e.g. the up-scaled window: resize to whole patches, keep the border
        images = F.interpolate(images, size=(gh * p, gw * p), mode="bilinear", align_corners=False)
    x = vit.conv1(images.to(vit.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, width]
    cls, pos = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), vit.positional_embedding.to(x.dtype)
    n = round(math.sqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False).to(x.dtype)
    x = torch.cat([cls, x], 1) + torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]])[None]
    x = vit.ln_pre(x).permute(1, 0, 2)  # [N+1, B, width], as CLIP's transformer expects
    *blocks, last = vit.transformer.resblocks
    for block in blocks:
        x = block(x)
    if variant == "maskclip":  # q and k are not needed: only the value third of the input projection
        v = F.linear(last.ln_1(x), *(t.chunk(3)[2] for t in (last.attn.in_proj_weight, last.attn.in_proj_bias)))
        y = x + last.attn.out_proj(v)
        y = y + last.mlp(last.ln_2(y))
    else:
        y = dense_clip_block(last, x, variant, (gh, gw))
    x = vit.ln_post(y[1:].permute(1, 0, 2)) @ vit.proj  # patches only: [B, N, D]
    x = F.normalize(x.float(), dim=-1)
    scores = x @ text_classifier.to(x.device, torch.float32).t()  # [B, N, C]
    return scores.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)

def dense_clip_block(last, x, variant, grid):
    """--dense-clip: later training-free last blocks, where patches attend to patches like them. x [N+1, B, width];
    per head q, k, v = in_proj(ln_1(x)) as nn.MultiheadAttention splits them, A(a, b) = softmax(a b^T / sqrt(d)):
      sclip       y = x + out_proj((A(q, q) + A(k, k)) v); y = y + mlp(ln_2(y))
      clearclip   y = out_proj(A(q, q) v)                  (no residual, no MLP)
      naclip      y = out_proj(softmax(k k^T / sqrt(d) + Omega) v)   (Omega: `neighbourhood`)"""
    qkv = F.linear(last.ln_1(x), last.attn.in_proj_weight, last.attn.in_proj_bias)
    q, k, v = (t.reshape(*x.shape[:2], last.attn.num_heads, -1).permute(1, 2, 0, 3) for t in qkv.chunk(3, dim=-1))
    attend = functools.partial(F.scaled_dot_product_attention, value=v)  # [B, heads, N+1, head_dim]
    y = {"sclip": lambda: attend(q, q) + attend(k, k), "clearclip": lambda: attend(q, q),
         "naclip": lambda: attend(k, k, attn_mask=neighbourhood(*grid, x.device).to(x.dtype))}[variant]()
    y = last.attn.out_proj(y.permute(2, 0, 1, 3).reshape(x.shape))
    if variant == "sclip":
        y = x + y
        y = y + last.mlp(last.ln_2(y))
    return y

def pseudo_mask(scores, image_labels, size):
    """scores [B,C,h,w] -> [B,H,W] long: bilinear upsampling, then argmax over each image's labelled classes only."""
    scores = F.interpolate(scores.float().contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                           align_corners=False)
    mask = scores.masked_fill_(image_labels[:, :, None, None] == 0, float("-inf")).argmax(1)
    mask[image_labels.sum(1) == 0] = 255
    return mask

# 2. Global-Local View Training ---------------------------------------------------------------------
def sample_window(crop, window, rate, offset, g):
    """(top, left, height, width, m): one window per batch, uniform inside the crop, m = rate * U[0,1) + offset."""
    h, w = min(window[0], crop[0]), min(window[1], crop[1])
    top = torch.randint(0, crop[0] - h + 1, (), generator=g).item()
    left = torch.randint(0, crop[1] - w + 1, (), generator=g).item()
    m = rate * torch.rand((), generator=g).item() + offset
    return top, left, h, w, m

def local_pseudo_mask(scorer, clip_images, image_labels, window):
    """The local pseudo-mask: CLIP on the window up-scaled by m, where a small object covers more 16x16 patches."""
    top, left, h, w, m = window
    patch = clip_images[:, :, top:top + h, left:left + w]
    patch = F.interpolate(patch, size=(int(h * m), int(w * m)), mode="bilinear", align_corners=False)
    return pseudo_mask(scorer(patch), image_labels, (h, w))

# 3. Model: torchvision DeepLabV3, classified by CLIP's text embeddings -----------------------------
BACKBONES = {  # name: (torchvision builder, its backbone's weights enum); the appendix adds the synthetic one
    "resnet50": (torchvision.models.segmentation.deeplabv3_resnet50, torchvision.models.ResNet50_Weights),
    "resnet101": (torchvision.models.segmentation.deeplabv3_resnet101, torchvision.models.ResNet101_Weights),
    "mobilenet_v3_large": (torchvision.models.segmentation.deeplabv3_mobilenet_v3_large,
                           torchvision.models.MobileNet_V3_Large_Weights)}

class Segmenter(nn.Module):
    """DeepLabV3 whose logits are its embedding dotted with CLIP's text classifier (a buffer, never trained)."""
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
        for name, m in list(self.named_modules()):
            if isinstance(m, nn.BatchNorm2d):  # MobileNetV3's BN momentum 0.01 suits long ImageNet runs; short runs
                m.momentum = 0.1  # need the PyTorch default 0.1 (ResNet's already) for usable eval statistics
            if isinstance(m, nn.Dropout):  # ASPP's Dropout(0.5): the official head has none, and CARB's P comes
                self.net.set_submodule(name.removeprefix("net."), nn.Identity())  # from this training forward

    def forward(self, images):
        embedding = self.net.classifier(self.net.backbone(images)["out"])  # [B, D, H/8, W/8]
        logits = torch.einsum("bdhw,cd->bchw", embedding, self.text_classifier.to(embedding.dtype))
        # fp32: under bf16 autocast, CUDA's backward of this upsampling sums 256 gradients per logit in bf16
        with torch.autocast(images.device.type, enabled=False):
            return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)

# 4. CARB loss: Consistency-Aware Region Balancing. Self-contained: copy this block; it needs only torch. ---
def masked_cross_entropy(logits, target):
    """Mean cross-entropy over the non-ignored (255) pixels; 0, never NaN, if there are none."""
    ce = torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=255, reduction="none")
    valid = target != 255
    return (ce * valid).sum() / valid.sum().clamp(min=1)

def region_losses(logits, pseudo_mask, image_labels):
    """logits [B,C,H,W], pseudo_mask [B,H,W] (255 = ignore), image_labels [B,C] in {0,1} -> CE(R_c), CE(R_i), R_c, R_i.
    The model's prediction P = argmax of the logits over each image's labelled classes; R_c = {pseudo_mask == P},
    R_i = the other labelled pixels (bool [B,H,W]); CE(R) = the mean cross-entropy over R, 0 if R is empty."""
    prediction = logits.detach().masked_fill(image_labels[:, :, None, None] == 0, float("-inf")).argmax(1)
    valid = pseudo_mask != 255
    consistent = valid & (pseudo_mask == prediction)
    inconsistent = valid & ~consistent
    ce = torch.nn.functional.cross_entropy(logits.float(), pseudo_mask, ignore_index=255, reduction="none")
    return ((ce * consistent).sum() / consistent.sum().clamp(min=1),
            (ce * inconsistent).sum() / inconsistent.sum().clamp(min=1), consistent, inconsistent)

def carb_loss(logits, pseudo_mask, image_labels, w):
    """The CARB loss L = CE(R_c) + w * CE(R_i) for a float w (a RegionBalancer's, or fixed): a pure function."""
    consistent_ce, inconsistent_ce, _, _ = region_losses(logits, pseudo_mask, image_labels)
    return consistent_ce + w * inconsistent_ce

class RegionBalancer:
    """Adaptive region weight w = coeff * mean(last `window` CE(R_c)) / mean(last `window` CE(R_i)): the disagreeing
    region counts as much less as it is harder. If every stored CE(R_i) is 0, w = coeff."""
    def __init__(self, coeff=1.0, window=5):
        self.coeff, self.window, self.weight = coeff, window, coeff
        self.consistent, self.inconsistent = [], []

    def update(self, consistent_ce, inconsistent_ce):
        """Queue one iteration's CE(R_c) and CE(R_i) (floats or tensors, read in one sync, without their graph); w."""
        ces = torch.stack([torch.as_tensor(consistent_ce), torch.as_tensor(inconsistent_ce)]).detach().tolist()
        self.consistent = (self.consistent + ces[:1])[-self.window:]
        self.inconsistent = (self.inconsistent + ces[1:])[-self.window:]
        mean_c = sum(self.consistent) / len(self.consistent)
        mean_i = sum(self.inconsistent) / len(self.inconsistent)
        self.weight = self.coeff * mean_c / mean_i if mean_i > 0 else self.coeff
        return self.weight

    def state_dict(self):
        return {"coeff": self.coeff, "window": self.window, "weight": self.weight,
                "consistent": list(self.consistent), "inconsistent": list(self.inconsistent)}

    def load_state_dict(self, state):
        self.__dict__.update(state)

# 5. One training step ------------------------------------------------------------------------------
def train_one_step(model, optimizer, scorer, batch, window, carb_on, region_weight, device, tick=lambda phase: None):
    """One whole CARB iteration, as torchvision's train_one_epoch does one batch: pseudo-masks, forward, both views'
    losses, zero_grad, backward, optimizer step; returns the log figures. `region_weight`: a RegionBalancer or a float;
    `window` None: the global view only; a batch of 4 carries the precomputed global mask; `tick`: --profile's."""
    images, image_labels, valid_hw, *precomputed = (t.to(device, non_blocking=True) for t in batch)
    x = images.float() / 255
    rows, cols = torch.arange(x.shape[-2], device=device), torch.arange(x.shape[-1], device=device)
    padded = (rows[None, :, None] >= valid_hw[:, 0, None, None]) | (cols[None, None, :] >= valid_hw[:, 1, None, None])
    tick("data wait")
    # pseudo-masks: CLIP on the whole crop (global) and on the up-scaled window (local); padding is ignored (255)
    clip_x = TF.normalize(x, CLIP_MEAN, CLIP_STD)
    if precomputed:  # already restricted to the labels, augmented with the image, padding 255
        global_mask = precomputed[0].long()
    else:
        global_mask = pseudo_mask(scorer(clip_x), image_labels, x.shape[-2:]).masked_fill(padded, 255)
    tick("CLIP global")
    if window is not None:
        top, left, height, width, _ = window
        local_mask = local_pseudo_mask(scorer, clip_x, image_labels, window)
        local_mask = local_mask.masked_fill(padded[:, top:top + height, left:left + width], 255)
    tick("CLIP local")
    seg_x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    if device.type == "cuda":
        seg_x = seg_x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(seg_x)
    tick("segmentation forward+backward")
    # L = CE(R_c) + w CE(R_i) + CE(R_c^local) + w CE(R_i^local); before --carb-start, the CE of each view
    ce_c, ce_i, consistent, inconsistent = region_losses(logits, global_mask, image_labels)  # logged from the start
    logs = {"ce_c": ce_c, "ce_i": ce_i}
    if carb_on:  # this iteration's CEs enter the balancer's queue before w is read, as in the official head
        w = region_weight.update(ce_c, ce_i) if isinstance(region_weight, RegionBalancer) else region_weight
        loss = logs["global"] = ce_c + w * ce_i
    else:
        loss = logs["global"] = masked_cross_entropy(logits, global_mask)
    if window is not None:  # the window's logits learn from the local mask with the global view's w (never queued)
        local_logits = logits[:, :, top:top + height, left:left + width]
        local_loss = carb_loss(local_logits, local_mask, image_labels, w) if carb_on \
            else masked_cross_entropy(local_logits, local_mask)
        loss = loss + local_loss
        logs["local"] = local_loss
    labelled = (global_mask != 255).sum().clamp(min=1)
    logs |= {"consistent": consistent.sum() / labelled, "inconsistent": inconsistent.sum() / labelled}
    logs = dict(zip(logs, torch.stack([v.detach().float().to(device) for v in logs.values()]).tolist()))  # one sync
    logs |= {"w": w} if carb_on else {}
    tick("CARB loss and balancer")
    if not math.isfinite(logs["global"] + logs.get("local", 0.0)):
        raise CarbError("non-finite loss (" + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()) + "): lower --lr, "
                        "or check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tick("segmentation forward+backward")
    optimizer.step()
    tick("optimizer")
    return logs

# 6. Data: Cityscapes, CamVid, WildDash2; image-level labels only (the experiment, after the method) ---
# The 19 evaluation classes and the labelId -> trainId map, from the table torchvision ships.
CITYSCAPES = [c for c in torchvision.datasets.Cityscapes.classes if not c.ignore_in_eval]
CLASS_NAMES = [c.name for c in CITYSCAPES]
LABEL_TO_TRAIN = torch.full((256,), 255, dtype=torch.uint8)
LABEL_TO_TRAIN[[c.id for c in CITYSCAPES]] = torch.tensor([c.train_id for c in CITYSCAPES], dtype=torch.uint8)
# The official CARB classes of CamVid (SegNet's 11) and WildDash2 (the 25 evaluated, in its panoptic.json's order).
CAMVID = ["Sky", "Building", "Pole", "Road", "Sidewalk", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist"]
WILDDASH2 = ["ego vehicle", "road", "sidewalk", "building", "wall", "fence", "guard rail", "pole", "traffic light",
             "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "motorcycle",
             "bicycle", "pickup", "van", "billboard", "streetlight", "road marking"]
# Per dataset: `images` and `labels` globs under --data-root whose wildcards match alike; its classes and label ids.
Dataset = collections.namedtuple("Dataset", "classes clip_names images labels label_values to_train")
DATASETS = {
    # CARB's names for CLIP: "tree" for vegetation, "pedestrian" for person, ... Labels: labelIds, 255 = -1.
    "cityscapes": Dataset(CLASS_NAMES, ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                                        "traffic sign", "tree", "grass", "sky", "pedestrian", "rider", "car",
                                        "truck", "bus", "train", "motorcycle", "bicycle"],
                          "leftImg8bit/{split}/*/*_leftImg8bit.png", "gtFine/{split}/*/*_gtFine_labelIds.png",
                          sorted({c.id % 256 for c in torchvision.datasets.Cityscapes.classes}), LABEL_TO_TRAIN),
    "camvid": Dataset(CAMVID, [c.lower() for c in CAMVID], "img/{split}/*.png", "mask/{split}/*.png",
                      list(range(11)) + [255], torch.arange(256, dtype=torch.uint8)),
    "wilddash2": Dataset(WILDDASH2, [c.replace("road marking", "roadmarking") for c in WILDDASH2], "img/{split}/*.jpg",
                         "mask/{split}/*_labelTrainIds.png", list(range(25)) + [255],
                         torch.arange(256, dtype=torch.uint8)),
}

def list_split(root, split, data="cityscapes"):
    """The image and label files of one split, in the dataset's layout (DATASETS)."""
    ds = DATASETS[data]
    images_glob, labels_glob = (os.path.join(root, p.format(split=split)) for p in (ds.images, ds.labels))
    (head, *_, tail), (label_head, *_, label_tail) = images_glob.split("*"), labels_glob.split("*")
    images = sorted(glob(images_glob))
    if not images:
        raise CarbError(f"{os.path.dirname(head)} holds no {os.path.basename(images_glob)} files: --data-root must be "
                        f"the folder that holds {ds.images.format(split=split)} for --data {data}")
    return images, [label_head + p[len(head):len(p) - len(tail)] + label_tail for p in images]

def image_id(path):
    """frankfurt_000000_000294 for .../frankfurt_000000_000294_leftImg8bit.png; other images: the file name's stem."""
    return os.path.splitext(os.path.basename(path))[0].removesuffix("_leftImg8bit")

def read_file(path, what="image", header_only=False):
    """An image (uint8 [3,H,W], RGB) or a label (numpy, as stored), or its (H, W); else a one-line error."""
    try:
        with Image.open(path) as f:
            if header_only:
                return f.size[::-1]
            if what != "image":
                return np.array(f)
            return torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (OSError, ValueError) as e:
        raise CarbError(f"cannot read {what} {path} ({e}): re-extract or remove it") from None

def read_train_ids(path, data="cityscapes"):
    """A label file of the dataset -> uint8 [H,W] of train indices (255 = ignore)."""
    ds, label = DATASETS[data], read_file(path, "label")
    if label.ndim != 2 or not np.isin(label, ds.label_values).all():
        found = f"{label.shape[-1]} channels" if label.ndim != 2 else f"values {np.setdiff1d(label, ds.label_values)}"
        raise CarbError(f"label {path} holds {found}: --data {data} label files ({os.path.basename(ds.labels)}) are "
                        f"one channel of {ds.label_values[0]}-{ds.label_values[-2]} or 255 (colours, or another set?)")
    return ds.to_train[torch.from_numpy(label.astype(np.uint8)).long()]

def check_pairs(images, gts):
    """Fail before training, not hours into it: every image has a label file of its size (headers only)."""
    missing = [g for g in gts if not os.path.isfile(g)]
    if missing:
        raise CarbError(f"{len(missing)} label files are missing, the first {missing[0]} (of "
                        f"{images[gts.index(missing[0])]}): every image needs its label file")
    for img, gt in zip(images, gts):
        img_size, gt_size = read_file(img, header_only=True), read_file(gt, "label", header_only=True)
        if img_size != gt_size:
            raise CarbError(f"{gt} is {gt_size} but its image {img} is {img_size}: they must be the same size")

def image_level_labels(gt_paths, num_classes, cache_dir, image_paths=None, data="cityscapes"):
    """[N, C] uint8: the classes in each image, all that training takes from the GT masks (cached)."""
    key = hashlib.sha1(repr((data, [os.path.abspath(p) for p in gt_paths])).encode()).hexdigest()[:16]

    def compute():
        if image_paths is not None:
            check_pairs(image_paths, gt_paths)
        labels = torch.zeros(len(gt_paths), num_classes, dtype=torch.uint8)
        for i, p in enumerate(tqdm(gt_paths, desc="image-level labels", leave=False)):
            present = read_train_ids(p, data).unique().long()
            labels[i, present[present < num_classes]] = 1
        return labels

    return cached(os.path.join(cache_dir, f"image_labels_{key}.pt"), gt_paths, compute, "image-level labels")

def read_image_labels(path, image_paths, data="cityscapes"):
    """--image-labels: a JSON object {image id: [class names]} -> [N, C] uint8 for `image_paths`, in order."""
    index = {name.lower(): c for c, name in enumerate(DATASETS[data].classes)}
    try:
        with open(path) as f:
            tags = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CarbError(f"--image-labels {path}: unreadable, or not JSON ({e})") from None
    if not isinstance(tags, dict):
        raise CarbError(f'--image-labels {path} must be one JSON object {{"IMAGE_ID": ["CLASS", ...], ...}}')
    labels = torch.zeros(len(image_paths), len(index), dtype=torch.uint8)
    for i, key in enumerate(map(image_id, image_paths)):
        for name in tags.get(key, [None]):
            if str(name).lower() not in index:
                raise CarbError(f"--image-labels {path}: {key} ({image_paths[i]}) " + (
                    f"lists {name!r}, not a --data {data} class ({', '.join(index)})" if name else "has no entry: list "
                    "every training image, with [] for one that shows none of the classes"))
            labels[i, index[name.lower()]] = 1
    return labels

def photometric_params(g):
    """mmseg's PhotoMetricDistortion draws in its order, each None (skipped) with probability 1/2 (README, dev. 9)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    coin = lambda: torch.rand((), generator=g).item() < 0.5  # noqa: E731
    brightness, contrast_first = u(-32, 32) if coin() else None, coin()
    contrast = u(0.5, 1.5) if contrast_first and coin() else None
    saturation = u(0.5, 1.5) if coin() else None
    hue = torch.randint(-18, 18, (), generator=g).item() if coin() else None  # numpy's randint(-18, 18): to 17
    contrast = u(0.5, 1.5) if not contrast_first and coin() else contrast
    return dict(brightness=brightness, contrast=contrast, contrast_first=contrast_first, saturation=saturation, hue=hue)

def photometric_distortion(img, p):
    """A uint8 [3,H,W] image distorted by photometric_params `p`, truncated to uint8 after each step as mmseg does."""
    convert = lambda x: x.clamp(0, 255).to(torch.uint8)  # noqa: E731  (np.clip, then astype(np.uint8))
    contrast = lambda x: convert(x.float() * p["contrast"]) if p["contrast"] is not None else x  # noqa: E731
    img = convert(img.float() + p["brightness"]) if p["brightness"] is not None else img
    img = contrast(img) if p["contrast_first"] else img
    img = TF.adjust_saturation(img, p["saturation"]) if p["saturation"] is not None else img  # uint8 in and out
    img = TF.adjust_hue(img, p["hue"] / 180) if p["hue"] is not None else img  # d units of 2 degrees: d / 180 turn
    return img if p["contrast_first"] else contrast(img)

class WeakTrainSet(torch.utils.data.Dataset):
    """Crops (uint8, padded), image-level labels, valid_hw (the image in the crop) [, the global mask], augmented."""
    def __init__(self, images, labels, crop, base_size, scale_range, seed, photometric=True, global_masks=None,
                 oracle=None):  # oracle: --data, whose label files `global_masks` are (the GT); else trainId PNGs
        self.images, self.labels, self.seed, self.photometric, self.oracle = images, labels, seed, photometric, oracle
        self.crop, self.base_size, self.scale_range, self.global_masks = crop, base_size, scale_range, global_masks

    def __getitem__(self, item):
        k, i = item  # (global sample number, image index), from InfiniteSampler
        g, img = torch.Generator().manual_seed(self.seed * 1_000_003 + k), read_file(self.images[i])
        # mmseg Resize(img_scale=(long, short), ratio_range, keep_ratio): fit the image inside the scaled base size
        lo, hi = self.scale_range
        r = lo + (hi - lo) * torch.rand((), generator=g).item()
        h, w = img.shape[-2:]
        s = min(r * max(self.base_size) / max(h, w), r * min(self.base_size) / min(h, w))
        img = TF.resize(img, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
        h, w = img.shape[-2:]
        ch, cw = min(self.crop[0], h), min(self.crop[1], w)
        top = torch.randint(0, h - ch + 1, (), generator=g).item()
        left = torch.randint(0, w - cw + 1, (), generator=g).item()
        flip = torch.rand((), generator=g).item() < 0.5
        img = img[:, top:top + ch, left:left + cw]
        img = img.flip(-1) if flip else img
        if self.photometric:
            img = photometric_distortion(img, photometric_params(g))
        pad = (0, self.crop[1] - cw, 0, self.crop[0] - ch)
        item = (F.pad(img, pad), self.labels[i].float(), torch.tensor([ch, cw]))  # padding is ignored by every loss
        if self.global_masks is None:
            return item
        path = self.global_masks[i]
        mask = (read_train_ids(path, self.oracle) if self.oracle else torch.from_numpy(read_file(path, "mask")))[None]
        mask = TF.resize(mask, [h, w], interpolation=TF.InterpolationMode.NEAREST)[0, top:top + ch, left:left + cw]
        return item + (F.pad(mask.flip(-1) if flip else mask, pad, value=255),)

class InfiniteSampler(torch.utils.data.Sampler):
    """(k, index) for k = start, start+1, ...: epoch k // n of a seeded permutation; batch t to rank t % N."""
    def __init__(self, n, seed, start=0, rank=0, world=1, batch=1):
        self.n, self.seed, self.start, self.rank, self.world, self.batch = n, seed, start, rank, world, batch

    def __iter__(self):
        for k in itertools.count(self.start):
            epoch, j = divmod(k, self.n)
            if j == 0 or k == self.start:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            if k // self.batch % self.world == self.rank:
                yield k, perm[j].item()

class EvalSet(torch.utils.data.Dataset):
    """(image uint8 [3,H,W], trainId mask uint8 [H,W] or None if gts is None) at full resolution."""
    def __init__(self, images, gts, data="cityscapes"):
        self.images, self.gts, self.data = images, gts, data

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return read_file(self.images[i]), read_train_ids(self.gts[i], self.data) if self.gts else None

@torch.no_grad()
def precompute_global_masks(scorer, classifier, images, labels, args, device, rank=0, world=1):
    """--global-masks precompute: each training image's global pseudo-mask at the base size, once, as a PNG."""
    model = os.path.abspath(args.clip_model) if os.path.isfile(args.clip_model) else args.clip_model
    inputs = repr(([os.path.abspath(p) for p in images], model, args.dense_clip, tuple(args.base_size))).encode()
    key = hashlib.sha1(inputs + labels.numpy().tobytes() + classifier.float().numpy().tobytes()).hexdigest()[:16]
    folder = os.path.join(args.cache_dir, f"global_masks_{key}")
    os.makedirs(folder, exist_ok=True)
    stats = [os.stat(p) for p in images]  # in the names: a changed image gets a new mask
    paths = [os.path.join(folder, f"{i:05d}_{image_id(p)}_{s.st_size}_{s.st_mtime_ns}.png")
             for i, (p, s) in enumerate(zip(images, stats))]
    for i in tqdm(range(rank, len(images), world), desc="global pseudo-masks", leave=False, disable=rank > 0):
        if not os.path.isfile(paths[i]):  # a file that exists is complete
            img = read_file(images[i])
            s = min(max(args.base_size) / max(img.shape[-2:]), min(args.base_size) / min(img.shape[-2:]))
            size = [max(1, round(img.shape[1] * s)), max(1, round(img.shape[2] * s))]  # WeakTrainSet's, at ratio 1
            x = TF.normalize(TF.resize(img, size, antialias=True)[None].to(device) / 255, CLIP_MEAN, CLIP_STD)
            mask = pseudo_mask(scorer(x), labels[i:i + 1].to(device), size)[0]
            Image.fromarray(mask.byte().cpu().numpy()).save(paths[i] + ".tmp", format="PNG")
            os.replace(paths[i] + ".tmp", paths[i])
    return paths

# 7. The training loop ------------------------------------------------------------------------------
def atomic_save(obj, path):
    """torch.save to PATH.tmp, flushed to disk, renamed over `path`: `path` is always whole, even on a full disk."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise CarbError(f"cannot write {path} ({e.strerror or e}): free disk space, then run again (with --resume for "
                        f"a run); {path} was left as it was") from None

def cached(path, files, compute, what):
    """compute(), kept at `path` with the (size, mtime) of the `files` it reads: stale once one of them changes."""
    stats = [(os.stat(f).st_size, os.stat(f).st_mtime_ns) if os.path.exists(f) else None for f in files]
    with contextlib.suppress(Exception):  # no cache yet, or a damaged one: compute it
        entry = torch.load(path, weights_only=True)
        changed = [f for f, old, new in zip(files, entry["stats"], stats) if new not in (None, tuple(old))]
        if len(entry["stats"]) == len(stats) and not changed:
            return entry["value"]
        if changed:
            tqdm.write(f"carb.py: {what}: {len(changed)} of the files changed since cached, the first {changed[0]}: "
                       "computing them again")
    value = compute()
    atomic_save({"stats": stats, "value": value}, path)
    return value

def make_model(args, classifier, device, ddp=False, ckpt=None):
    """The Segmenter, its optimizer and its region weight (a RegionBalancer, or a float); as `ckpt` left them."""
    model = Segmenter(args.backbone, classifier, args.backbone_weights).to(device)
    if ddp and device.type == "cuda":  # one BatchNorm over all GPUs' images, as one GPU with N*B images
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.optimizer == "sgd":  # the official schedule
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    else:  # synthetic default: a from-scratch backbone learns several times faster with AdamW in a short run
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    region_weight = float(args.region_weight) if args.region_weight != "adaptive" else \
        DistributedRegionBalancer() if ddp else RegionBalancer()
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CarbError(f"--resume: {os.path.join(args.out, 'last.pth')} does not fit this run's model or "
                            f"optimizer ({str(e).splitlines()[-1].strip()[:160]})") from None
        if ckpt.get("balancer") and isinstance(region_weight, RegionBalancer):
            region_weight.load_state_dict(ckpt["balancer"])
    return model, optimizer, region_weight

class DistributedRegionBalancer(RegionBalancer):
    """torchrun: CE(R_c) and CE(R_i) averaged over the ranks enter the window: one history and one w on all ranks."""
    def update(self, consistent_ce, inconsistent_ce):
        ces = torch.stack([consistent_ce.detach(), inconsistent_ce.detach()]).float()
        dist.all_reduce(ces)
        return super().update(*(ces / dist.get_world_size()).tolist())

def worker_signals(done, worker_id):
    """DataLoader workers leave a Ctrl-C or SIGTERM (SLURM's, to every process) to the main process while it saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0) if done.is_set() else None)

LOG_COLUMNS = ["iteration", "lr", "global", "local", "ce_c", "ce_i", "w", "consistent", "inconsistent", "val_miou"]

def open_log(path, start):
    """RUN/log.csv, a row per iteration; rows from `start` on are dropped: a resumed run's log is an unbroken one's."""
    rows = []
    if start and os.path.isfile(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if len(r) == len(LOG_COLUMNS) and r[0].isdigit() and int(r[0]) < start]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows([LOG_COLUMNS] + rows)
    os.replace(path + ".tmp", path)
    return open(path, "a", newline="", buffering=1)

class Interrupted(Exception):
    """SIGINT or SIGTERM during training, raised once the last finished iteration is saved: (signum, iter, path)."""

def load_checkpoint(path, flag="--ckpt"):
    """A carb.py checkpoint, loaded with weights_only=True (tensors and plain data; no code is unpickled)."""
    if not os.path.isfile(path):
        raise CarbError(f"{flag} {path} not found: pass RUN/last.pth (or RUN/best.pth) of a carb.py run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CarbError(f"{flag} {path} holds more than tensors and plain data: not a carb.py checkpoint") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CarbError(f"{flag} {path} cannot be read ({str(e).splitlines()[0]}): truncated or not a checkpoint; use "
                        "the run's other checkpoint (last.pth / best.pth)") from None
    if not (isinstance(ckpt, dict) and {"model", "iteration", "args"} <= ckpt.keys()
            and isinstance(ckpt["model"], dict) and isinstance(ckpt["args"], dict)):
        raise CarbError(f"{flag} {path} is not a carb.py checkpoint (no model, iteration and args)")
    return ckpt

def resume_checkpoint(args, last):
    """None for a new run; for --resume, RUN/last.pth; refused now if it cannot continue the run."""
    if os.path.isfile(args.out):
        raise CarbError(f"--out {args.out} is a file: pass a folder")
    if args.resume and not os.path.isfile(last):
        raise CarbError(f"--resume: {last} not found; drop --resume to start a new run")
    if not args.resume and os.path.isfile(last):  # a new run would overwrite it at its first validation
        raise CarbError(f"--out {args.out} already holds a run ({last}): add --resume to continue it, or pass "
                        "another --out (or delete it) to start anew")
    ckpt = load_checkpoint(last, "--resume") if args.resume else None
    for key in ("data", "backbone", "optimizer", "clip_model", "dense_clip", "oracle") if ckpt else ():
        trained = ckpt["args"].get(key, {"dense_clip": "maskclip", "oracle": False}.get(key))  # runs from before them
        if trained != getattr(args, key):
            raise CarbError(f"--resume: {last} was trained with --{key.replace('_', '-')} {trained}, not "
                            f"{getattr(args, key)}: pass the run's own")
    if ckpt and ckpt["iteration"] > args.iters:
        raise CarbError(f"--resume: {last} is at iteration {ckpt['iteration']}, beyond --iters {args.iters}")
    return ckpt

class Stopwatch:
    """--profile: `watch(phase)` charges the time since its last call to `phase` (CUDA synced); `table(steps)`."""
    STEP = ["data wait", "CLIP global", "CLIP local", "segmentation forward+backward", "CARB loss and balancer",
            "optimizer"]

    def __init__(self, device):
        self.device, self.totals, self.last = device, collections.Counter(), time.perf_counter()

    def __call__(self, phase):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[phase] += time.perf_counter() - self.last
        self.last = time.perf_counter()

    def table(self, steps):
        """Seconds, ms per step and share of the step, per phase."""
        step = sum(self.totals[p] for p in self.STEP)
        lines = [f"{'phase':<34}{'total s':>10}{'ms/step':>10}{'% of step':>11}"]
        for phase, t in [(p, self.totals[p]) for p in self.STEP] + [("step", step)]:
            lines.append(f"{phase:<34}{t:>10.2f}{1000 * t / max(steps, 1):>10.1f}{100 * t / max(step, 1e-9):>11.1f}")
        lines.append(f"{'(between steps: val, checkpoints)':<34}{sum(self.totals.values()) - step:>10.2f}")
        return "\n".join(lines)

def setup_distributed(args):
    """(ddp, rank, world, device). Under torchrun, one process per GPU (gloo processes on a CPU)."""
    device = torch.device(args.device)
    if "RANK" not in os.environ:
        return False, 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return True, dist.get_rank(), dist.get_world_size(), device

def prepare_data(args, device, rank, world, barrier):
    """(train set, val set, scorer, text classifier): rank 0 writes the synthetic data and the caches first."""
    if rank > 0:
        barrier()
    torch.manual_seed(args.seed)
    if args.data == "synthetic":
        make_synthetic(args.data_root, size=DEFAULTS["synthetic"]["base_size"])
    train_images, train_gts = list_split(args.data_root, "train", args.data)
    if args.image_labels:  # given: no train mask is ever opened
        image_labels = read_image_labels(args.image_labels, train_images, args.data)
    else:  # the train GT's only use (bar --oracle)
        num_classes = len(DATASETS[args.data].classes)
        image_labels = image_level_labels(train_gts, num_classes, args.cache_dir, train_images, args.data)
    val_set = EvalSet(*list_split(args.data_root, "val", args.data), args.data)
    check_pairs(val_set.images, val_set.gts)  # now, not at the first validation
    scorer, classifier = build_scorer(args, device)
    if rank == 0:  # the data and caches are written: the other ranks can read them
        barrier()
    global_masks = train_gts if args.oracle else None  # --oracle: the one use of the train GT beyond its labels
    if args.global_masks == "precompute" and not args.oracle:  # each rank writes every world-th mask, then waits
        global_masks = precompute_global_masks(scorer, classifier, train_images, image_labels, args, device, rank,
                                               world)
        barrier()
    train_set = WeakTrainSet(train_images, image_labels, args.crop, args.base_size, args.scale_range, args.seed,
                             args.photometric, global_masks, args.data if args.oracle else None)
    return train_set, val_set, scorer, classifier

def stop_on_signals(ddp):
    """Ctrl-C / SIGTERM stop after this iteration (a second acts as usual) -> (signals received, old handlers)."""
    stop, handlers = [], {}

    def request_stop(signum, frame):
        stop.append(signum)
        if not ddp:
            signal.signal(signum, handlers[signum])
    for s in (signal.SIGINT, signal.SIGTERM):
        handlers[s] = signal.signal(s, request_stop) or signal.SIG_DFL  # None: a handler not set from Python
    return stop, handlers

def main(args):
    """Train with `args`; print and return the val IoUs {"pseudo-mask": [C], "model": [C]} (None on ranks > 0)."""
    last = os.path.join(args.out, "last.pth")
    ckpt = resume_checkpoint(args, last)  # None for a new run; refused now if it cannot continue this one
    ddp, rank, world, device = setup_distributed(args)
    barrier = dist.barrier if ddp else lambda: None
    train_set, val_set, scorer, classifier = prepare_data(args, device, rank, world, barrier)
    model, optimizer, region_weight = make_model(args, classifier, device, ddp, ckpt)
    balancer = region_weight if isinstance(region_weight, RegionBalancer) else None
    start, best, miou = (ckpt["iteration"], ckpt["best_miou"], ckpt["miou"]) if ckpt else (0, -1.0, None)
    ious = {}

    def save(path, done):
        nonlocal saved
        if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
            raise CarbError(f"the weights became non-finite by iteration {done}; {path} was not overwritten: "
                            "lower --lr")
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": done,
                     "balancer": balancer.state_dict() if balancer else None, "miou": miou,
                     "best_miou": max(best, -1.0 if miou is None else miou), "args": vars(args)}, path)
        saved = done if path == last else saved
    log = open_log(os.path.join(args.out, "log.csv"), start) if rank == 0 else open(os.devnull, "w")
    training_done = multiprocessing.Event()  # then the DataLoader's SIGTERM at shutdown ends its workers
    loader = functools.partial(torch.utils.data.DataLoader, num_workers=args.workers,
                               worker_init_fn=functools.partial(worker_signals, training_done))
    sampler = InfiniteSampler(len(train_set.images), args.seed, start * args.batch_size * world, rank, world,
                              args.batch_size)
    batches = iter(loader(train_set, batch_size=args.batch_size, sampler=sampler, pin_memory=device.type == "cuda",
                          persistent_workers=args.workers > 0))
    val_loader = loader(val_set, batch_size=1)
    ddp_model = nn.parallel.DistributedDataParallel(model, [device.index] if device.type == "cuda" else None) \
        if ddp else model  # torchrun: gradients are averaged over the ranks in backward: one step on every rank
    stop, handlers = stop_on_signals(ddp)
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc="train", disable=rank > 0)
    watch = Stopwatch(device) if args.profile else lambda phase: None
    done = saved = start
    try:
        for it in bar:
            lr = (args.lr - args.min_lr) * (1 - it / args.iters) ** 0.9 + args.min_lr  # mmcv's poly, with a floor
            for group in optimizer.param_groups:
                group["lr"] = lr
            # All randomness of iteration `it` comes from (seed, it) -- the window, then the global RNG -- and the
            # batch from (seed, sample number): a resumed run repeats the uninterrupted one, with any --workers.
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
            window = sample_window(args.crop, args.window, *args.multiplier, g)  # drawn even if unused: the
            torch.manual_seed(torch.randint(2 ** 62, (), generator=g).item() + rank)  # variants share randomness
            logs = train_one_step(ddp_model, optimizer, scorer, next(batches), None if args.no_local_view else window,
                                  it >= args.carb_start, region_weight, device, watch)
            bar.set_postfix({k: f"{logs[k]:.3f}" for k in LOG_COLUMNS[2:-2] if k in logs} | {"lr": f"{lr:.2e}"})
            done, val_now = it + 1, rank == 0 and ((it + 1) % args.val_every == 0 or it + 1 == args.iters)
            if val_now:
                ious = validate(model, val_loader, scorer if done == args.iters else None)  # the last: CLIP's too
                miou = mean_iou(ious["model"])
                tqdm.write(f"iter {done}: val mIoU {miou:.2f}")
            csv.writer(log).writerow([it, lr, *[logs.get(k, "") for k in LOG_COLUMNS[2:-1]], miou if val_now else ""])
            if val_now:
                save(last, done)
                if miou > best:
                    best = miou
                    save(os.path.join(args.out, "best.pth"), done)
            if ddp:  # all ranks stop after the same iteration, whichever got the signal
                signum = torch.tensor(stop[:1] or [0], device=device)
                dist.all_reduce(signum, op=dist.ReduceOp.MAX)
                stop[:] = [s for s in signum.tolist() if s]
            watch("between steps")
            if stop:
                if rank == 0 and not val_now:
                    save(last, done)
                raise Interrupted(stop[0], done, last)
    except (CarbError, OSError) as e:  # found mid-run (a truncated image, a full disk): keep the finished iterations
        if rank == 0 and done > saved:
            with contextlib.suppress(CarbError):  # non-finite weights, or the disk is full: last.pth stays as it was
                save(last, done)
        kept = f"{last} holds iteration {saved}: once fixed, continue with --resume" if os.path.isfile(last) else \
            "nothing was saved"  # failed before any iteration could be kept
        raise CarbError(f"iteration {done}: {e}; {kept}") from None
    finally:
        training_done.set()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        log.close()
        bar.close()
    if rank > 0:
        return None
    if args.profile:
        print(watch.table(args.iters - start))
    ious = ious if "pseudo-mask" in ious else validate(model, val_loader, scorer)  # resumed at --iters: none yet
    if args.data == "synthetic" or args.oracle:
        print(f"({'--oracle: trained on GT masks' if args.oracle else 'synthetic stand-in data'}: not CARB results)")
    print(f"pseudo-mask mIoU: {mean_iou(ious['pseudo-mask']):.2f}\nmodel mIoU: {mean_iou(ious['model']):.2f}")
    print("per-class table: " + shlex.join(["python", "eval.py", "--data-root", args.data_root, "--ckpt", last,
                                           "--clip", "--cache-dir", args.cache_dir]))
    return ious

# 8. Validation: the confusion matrix and mIoU, on the model in memory ---------------------------------
@torch.no_grad()
def predict(model, images):
    """uint8 images [B,3,H,W] -> trainIds [B,H,W]: the whole image at full resolution, as the official test config."""
    x = TF.normalize(images.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        return model(x).argmax(1)

def present_classes(gt, num_classes):
    """trainId mask [H,W] -> [C] float, 1 for each class in it: the image-level labels of one image."""
    return (torch.bincount(gt[gt != 255].long(), minlength=num_classes)[:num_classes] > 0).float()

def confusion_matrix(pred, gt, num_classes):
    """[C, C+1] counts, rows = GT, columns = prediction; void predictions (>= C) are misses, as in cityscapesscripts."""
    keep = gt != 255
    idx = gt[keep].long() * (num_classes + 1) + pred[keep].long().clamp(0, num_classes)
    return torch.bincount(idx, minlength=num_classes * (num_classes + 1)).reshape(num_classes, num_classes + 1)

def iou_from_confusion(conf):
    """Per-class IoU = tp / (tp + fp + fn) of a confusion matrix; NaN for a class neither in GT nor predicted."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf[:, :len(tp)].sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

def mean_iou(iou):
    """Mean over the classes that occur (NaN entries left out), in percent."""
    return 100 * iou[~iou.isnan()].mean().item()

@torch.no_grad()
def validate(model, loader, scorer=None):
    """Per-class val IoUs {"model": [C]} in eval mode; with CLIP's scorer, "pseudo-mask" too (each GT's classes)."""
    model.eval()
    device, num_classes = next(model.parameters()).device, len(DATASETS[loader.dataset.data].classes)
    conf = collections.defaultdict(lambda: torch.zeros(num_classes, num_classes + 1, dtype=torch.long, device=device))
    for images, gts in tqdm(loader, desc="val", leave=False):
        images, gts = images.to(device), gts.to(device)
        if scorer is not None:
            labels = torch.stack([present_classes(g, num_classes) for g in gts])
            masks = pseudo_mask(scorer(TF.normalize(images.float() / 255, CLIP_MEAN, CLIP_STD)), labels, gts.shape[-2:])
            conf["pseudo-mask"] += confusion_matrix(masks, gts, num_classes)
        conf["model"] += confusion_matrix(predict(model, images), gts, num_classes)
    model.train()
    return {title: iou_from_confusion(c) for title, c in conf.items()}

# 9. The command line -------------------------------------------------------------------------------
# Defaults per --data: the official configs/carb/*_carb_dual.py (2 GPUs x 4 images; here 8 on one); synthetic: a CPU.
CITYSCAPES_DEFAULTS = dict(
    data_root="data/cityscapes", out="runs/cityscapes", iters=30000, batch_size=8, crop=(512, 1024),
    base_size=(1024, 2048), scale_range=(0.5, 2.0), window=(512, 256), multiplier=(1.0, 1.0), carb_start=16000,
    optimizer="sgd", lr=0.005, min_lr=1e-4, backbone="resnet50", backbone_weights="IMAGENET1K_V1",
    clip_model="ViT-B/16", val_every=2000, workers=4, photometric=True)
DEFAULTS = {
    "cityscapes": CITYSCAPES_DEFAULTS,
    "camvid": CITYSCAPES_DEFAULTS | dict(data_root="data/camvid", out="runs/camvid", iters=12000, crop=(720, 960),
                                         base_size=(720, 960), scale_range=(1.0, 4.0), multiplier=(2.0, 0.5),
                                         carb_start=4000),
    "wilddash2": CITYSCAPES_DEFAULTS | dict(data_root="data/wilddash2", out="runs/wilddash2"),
    "synthetic": dict(data_root="data/synthetic", out="runs/synthetic", iters=400, batch_size=4, crop=(128, 256),
                      base_size=(256, 512), scale_range=(0.5, 2.0), window=(128, 64), multiplier=(1.0, 1.0),
                      carb_start=213, optimizer="adamw", lr=2e-3, min_lr=1e-5, backbone="mobilenet_v3_stride8",
                      backbone_weights="none", clip_model="simulated", val_every=400, workers=1, photometric=False)}

class Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is one line and exit code 2; the experiments are eval.py's now
        raise CarbError(message + (": run python eval.py --ablation or --benchmark" if "--ablation" in message
                                   or "--benchmark" in message else ""))

def number(kind, low, strict=False):
    """An argparse type: a `kind` number >= low (> low if strict)."""
    def parse(text):
        if not (kind(text) > low if strict else kind(text) >= low):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if strict else 'at least'} {low}")
        return kind(text)
    return parse

def get_args_parser():
    """The flags. Those left out take --data's DEFAULTS, which --help lists."""
    defaults = [f"{n}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for n, d in DEFAULTS.items()]
    p = Parser(prog="carb.py", description="CARB: weakly supervised semantic segmentation for driving scenes.",
               epilog="defaults per --data:\n" + "\n".join(defaults), formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", choices=list(DEFAULTS), default="synthetic", help="dataset: classes, layout, defaults")
    p.add_argument("--data-root")
    p.add_argument("--image-labels", metavar="FILE", help='JSON {"IMAGE_ID": ["CLASS", ...]}: no train mask is read')
    p.add_argument("--out", help="run folder: last.pth (score this), best.pth (the best val mIoU: picked on "
                   "val, so optimistic there; for model selection or a held-out split), log.csv")
    for flag, low in [("--iters", 1), ("--batch-size", 1), ("--val-every", 1), ("--workers", 0)]:
        p.add_argument(flag, type=number(int, low))
    p.add_argument("--crop", type=number(int, 16), nargs=2, metavar=("H", "W"))
    p.add_argument("--scale-range", type=number(float, 0, True), nargs=2, metavar=("LO", "HI"), help="x base_size")
    p.add_argument("--window", type=number(int, 16), nargs=2, metavar=("H", "W"), help="the local view")
    p.add_argument("--multiplier", type=number(float, 0), nargs=2, metavar=("RATE", "OFFSET"), help="m = RATE*U+OFFSET")
    p.add_argument("--photometric", action=argparse.BooleanOptionalAction, help="colour jitter")
    p.add_argument("--carb-start", type=number(int, 0), help="iteration from which CARB replaces CE (ITERS: never)")
    p.add_argument("--region-weight", default="adaptive", help="'adaptive' (RegionBalancer) or a fixed number")
    p.add_argument("--no-local-view", action="store_true", help="global view only (an ablation variant)")
    p.add_argument("--oracle", action="store_true", help="train on the GT masks, CE, global view: the fully "
                   "supervised upper bound, not CARB (an ablation row; reads the train masks)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=number(float, 0, True))
    p.add_argument("--min-lr", type=number(float, 0))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clip-model", metavar="NAME_OR_PATH", help="clip.load name or file; 'simulated' (synthetic)")
    p.add_argument("--dense-clip", choices=DENSE_CLIP, default="maskclip", help="the pseudo-masks' last CLIP block")
    p.add_argument("--backbone", choices=list(BACKBONES))
    p.add_argument("--backbone-weights", help="torchvision weights name, or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/carb"), help="labels, text embeddings, masks")
    p.add_argument("--global-masks", choices=["online", "precompute"], default="online", help="CLIP per crop or image")
    p.add_argument("--profile", action="store_true", help="time each phase of the step; print a table at the end")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly from its last.pth")
    return p

def parse_args(argv=None, defaults=None):
    """The flags, then `defaults` and --data's for those left out; the refusals that need no file."""
    args = get_args_parser().parse_args(argv)
    for key, value in (DEFAULTS[args.data] | (defaults or {})).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.oracle:  # plain cross-entropy on the GT of the global view
        args.no_local_view, args.carb_start = True, args.iters
    lo, hi = args.scale_range
    largest = [round(hi * side) for side in args.base_size]
    for bad, message in [
        (args.carb_start > args.iters, f"--carb-start {args.carb_start} is beyond --iters {args.iters}: to train "
                                       f"without CARB (plain cross-entropy throughout) pass --carb-start {args.iters}"),
        (lo > hi, f"--scale-range {lo} {hi}: need LO <= HI"),
        # crops are padded (the official Pad); one larger than every rescaled image is a mistake (H and W swapped?)
        (args.crop[0] > largest[0] or args.crop[1] > largest[1], f"--crop {args.crop[0]} {args.crop[1]} is larger "
         f"than the largest rescaled image, {largest[0]} x {largest[1]} (--scale-range HI x base size)"),
        (args.multiplier[1] == 0, "--multiplier: OFFSET must be above 0"),
        (args.min_lr > args.lr, f"--min-lr {args.min_lr} is above --lr {args.lr}"),
        (args.oracle and args.image_labels, "--oracle reads the train GT masks, --image-labels says none: drop one"),
        (args.region_weight != "adaptive" and not re.fullmatch(r"\d*\.?\d+(e-?\d+)?", args.region_weight),
         f"--region-weight {args.region_weight}: use 'adaptive' or a number >= 0"),
        (args.clip_model == "simulated" and DATASETS[args.data] is not DATASETS["cityscapes"],
         f"--clip-model simulated knows only the Cityscapes classes: pass a CLIP model for --data {args.data}"),
        (args.clip_model == "simulated" and args.dense_clip != "maskclip",
         f"--dense-clip {args.dense_clip} changes CLIP's attention, which --clip-model simulated has not: pass a CLIP"),
    ]:
        if bad:
            raise CarbError(message)
    return args

def build_scorer(args, device):
    """(scorer, text_classifier): scorer maps CLIP-normalized images to stride-16 class scores."""
    if args.clip_model == "simulated":
        sim = SimulatedCLIP().to(device)
        return sim, sim.text_classifier.cpu()
    clip_model, names = load_clip(args.clip_model, device), DATASETS[args.data].clip_names
    clip_file = [os.path.abspath(args.clip_model)] if os.path.isfile(args.clip_model) else []  # names: clip.load checks
    key = hashlib.sha1(repr((clip_file or args.clip_model, names, TEMPLATES)).encode()).hexdigest()[:16]  # a SHA256
    classifier = cached(os.path.join(args.cache_dir, f"text_{key}.pt"), clip_file,
                        lambda: text_classifier(clip_model, names), "text embeddings")
    on_device = classifier.to(device)  # once: a copy from pageable memory at every call would stall the GPU queue
    scorer = functools.partial(maskclip_scores, clip_model, text_classifier=on_device, variant=args.dense_clip)
    return scorer, classifier

def run(argv=None, command=None):
    """Train, or `command(argv)` (eval.py's experiments): bad input is one line and exit 2; Ctrl-C/SIGTERM 130/143."""
    script = sys.argv[0] if argv is None else "carb.py"
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        return command(argv) if command else main(parse_args(argv))
    except CarbError as e:
        message, code = f"carb.py: error: {e}", 2
    except Interrupted as e:
        signum, iteration, path = e.args
        if int(os.environ.get("RANK", 0)) > 0:  # rank 0 reports and exits 128 + signal; if this rank exited
            return None                         # non-zero first, torchrun would kill rank 0 before it could
        launcher = [f"torchrun --nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}" if "RANK" in os.environ else "python"]
        command = " ".join(launcher + [shlex.join([script, *[a for a in argv if a != "--resume"], "--resume"])])
        message = (f"carb.py: stopped by {signal.Signals(signum).name} after iteration {iteration}; saved {path}\n"
                   f"carb.py: to continue: {command}")
        code = 128 + signum
    except KeyboardInterrupt:  # outside the training loop (setup, final evaluation) or a second Ctrl-C
        message, code = "carb.py: interrupted; the checkpoints in --out are as last saved", 128 + signal.SIGINT
    except OSError as e:  # a folder that cannot be written, a full disk
        message, code = f"carb.py: error: {e}: fix or free it, then run again (with --resume for a run)", 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(message, file=sys.stderr)
    sys.exit(code)

# Appendix, not the method: the synthetic stand-in (scenes at 1/4 Cityscapes' size, a 4-px simulated CLIP) ===========
SYNTH_COLORS = {  # labelId: (name, RGB): the scene's own colours, one base colour per class
    7: ("road", (80, 80, 88)), 8: ("sidewalk", (175, 160, 150)), 11: ("building", (125, 95, 80)),
    17: ("pole", (45, 45, 40)), 19: ("traffic light", (240, 120, 30)), 20: ("traffic sign", (225, 215, 50)),
    21: ("vegetation", (60, 125, 45)), 23: ("sky", (130, 180, 235)), 24: ("person", (200, 50, 70)),
    26: ("car", (40, 60, 160))}

def render_scene(rng, H, W):
    """A street (RGB uint8 [H,W,3], labelIds [H,W]) through Cityscapes' camera: S m at d m is f*S/d px."""
    lab, col = np.full((H, W), 23, np.uint8), np.zeros((H, W, 3), np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    f = 2262.5 * W / 2048  # Cityscapes' focal length (px), scaled with the image
    horizon = H * 513 / 1024 + rng.normal(0, H / 100)  # its principal point's row, and a little pitch

    def paint(mask, label_id):
        lab[mask] = label_id
        col[mask] = np.array(SYNTH_COLORS[label_id][1]) + rng.normal(0, 12, 3)  # per-instance colour jitter

    def thing(x, d, w, h, label_id, base=0.0):  # w x h m, centred on column x, d m away, its bottom `base` m up
        row = horizon + f * (1.2 - base - h / 2) / d  # the centre's row
        half_h, half_w = max(f * h / d, 1) / 2, max(f * w / d, 1) / 2  # at least one pixel
        paint((np.abs(yy + 0.5 - row) <= half_h) & (np.abs(xx + 0.5 - x) <= half_w), label_id)

    paint(np.ones((H, W), bool), 23)
    x = 0
    while x < W:  # skyline: buildings and trees down to the horizon
        w, top = int(rng.integers(W // 12, W // 4)), int(rng.integers(int(0.05 * H), int(horizon) - H // 10))
        paint((yy >= top) & (yy < horizon) & (xx >= x) & (xx < x + w), 11 if rng.random() < 0.7 else 21)
        x += w
    paint(yy >= horizon, 8)
    vanish, half, offset = W * rng.uniform(0.4, 0.6), rng.uniform(3.5, 7), rng.uniform(-2, 2)  # road and lane (m)
    lateral = (xx - vanish) * 1.2 / np.maximum(yy - horizon, 1e-3)  # metres from the camera's axis, on the ground
    paint((yy >= horizon) & (np.abs(lateral - offset) < half), 7)
    things = [("car", rng.uniform(10, 60)) for _ in range(int(rng.integers(1, 6)))]
    things += [("person", rng.uniform(10, 60)) for _ in range(int(rng.integers(1, 7)))]
    things += [(rng.choice(["light", "sign", "pole"], p=[0.35, 0.45, 0.2]), rng.uniform(10, 60))
               for _ in range(int(rng.integers(2, 7)))]
    for kind, d in sorted(things, key=lambda t: -t[1]):
        x = rng.uniform(0, W)
        if kind == "car":  # 1.8 x 1.5 m, in a lane of the road
            thing(vanish + f * (offset + rng.uniform(-1, 1) * max(half - 1.2, 0)) / d, d, 1.8, 1.5, 26)
        elif kind == "person":
            thing(x, d, 0.5, 1.7, 24)
        elif kind == "pole":  # a bare lamp post
            thing(x, d, 0.15, rng.uniform(4, 8), 17)
        else:  # a 0.3 x 0.9 m light atop a 3-4 m pole, or a 0.6 m sign atop 2.5-3.5 m (poles: 0.15 m wide)
            w, h, label_id, pole = (0.3, 0.9, 19, 3) if kind == "light" else (0.6, 0.6, 20, 2.5)
            pole += rng.uniform(0, 1)
            thing(x, d, 0.15, pole, 17)
            thing(x, d, w, h, label_id, base=pole - h)
    col = col * rng.uniform(0.85, 1.15) + rng.normal(0, 8, (H, W, 3))  # illumination and sensor noise
    return np.clip(col, 0, 255).astype(np.uint8), lab

def make_synthetic(root, size, n_train=300, n_val=200, seed=0):
    """Write the synthetic dataset once (a split that is already complete is skipped)."""
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir, gt_dir = (os.path.join(root, top, split, "synth") for top in ("leftImg8bit", "gtFine"))
        if len(glob(os.path.join(gt_dir, "*_labelIds.png"))) == n:
            continue
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        rng = np.random.default_rng([seed, split == "val"])
        for i in tqdm(range(n), desc=f"writing synthetic {split}", leave=False):
            rgb, lab = render_scene(rng, *size)
            Image.fromarray(rgb).save(os.path.join(img_dir, f"synth_{i:06d}_000019_leftImg8bit.png"))
            Image.fromarray(lab).save(os.path.join(gt_dir, f"synth_{i:06d}_000019_gtFine_labelIds.png"))

class SimulatedCLIP(nn.Module):
    """MaskCLIP's stand-in with CLIP's two failures (README): small objects outvoted in a patch, noise on large ones."""
    def __init__(self, noise=0.5, blobs=(3, 12), patch=4, dim=512, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        colors = [SYNTH_COLORS[c.id][1] if c.id in SYNTH_COLORS else c.color for c in CITYSCAPES]
        self.register_buffer("colors", torch.tensor(colors, dtype=torch.float32) / 255)  # [C, 3]
        self.register_buffer("projection", torch.randn(len(colors), 3, 1, 1, generator=g))
        self.register_buffer("text_classifier", torch.linalg.qr(torch.randn(dim, len(colors), generator=g))[0].t())
        self.noise, self.blobs, self.patch, self.temperature = noise, blobs, patch, 0.01

    @torch.inference_mode()
    def forward(self, images):
        H, W = images.shape[-2:]
        gh, gw = max(1, int(H / self.patch + 0.5)), max(1, int(W / self.patch + 0.5))
        images = F.interpolate(images.float(), size=(gh * self.patch, gw * self.patch), mode="bilinear")
        mean, std = (torch.tensor(v, device=images.device)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
        rgb = images * std + mean
        dist2 = ((rgb[:, None] - self.colors[None, :, :, None, None]) ** 2).sum(2)  # [B, C, H, W]
        share = F.avg_pool2d(torch.softmax(-dist2 / self.temperature, 1), self.patch)  # [B, C, gh, gw]
        texture = rgb - F.avg_pool2d(rgb, 5, 1, 2, count_include_pad=False)
        field, scores = F.avg_pool2d(F.conv2d(texture, self.projection), self.patch), share
        for k in self.blobs:
            blobs, presence = (F.interpolate(F.avg_pool2d(t, min(k, gh, gw), ceil_mode=True), size=(gh, gw),
                                             mode="bilinear") for t in (field, share))
            blobs = (blobs - blobs.mean((2, 3), keepdim=True)) / (blobs.std((2, 3), keepdim=True) + 1e-6)
            scores = scores + self.noise * blobs * presence.sqrt()  # as much as the class is there: large regions
        return scores

def deeplabv3_mobilenet_stride8(weights=None, weights_backbone=None, num_classes=21, aux_loss=False):
    """DeepLabV3 on MobileNetV3-Large's first 7 blocks: stride 8, as the paper's ResNet-50 (torchvision's is 16)."""
    features = torchvision.models.mobilenet_v3_large(weights=weights_backbone).features[:7]
    backbone = create_feature_extractor(features, {"6": "out"})
    return torchvision.models.segmentation.DeepLabV3(backbone, DeepLabHead(40, num_classes))

BACKBONES["mobilenet_v3_stride8"] = (deeplabv3_mobilenet_stride8, torchvision.models.MobileNet_V3_Large_Weights)
DATASETS["synthetic"] = DATASETS["cityscapes"]  # written as Cityscapes labelIds in the Cityscapes layout

if __name__ == "__main__":
    run()
