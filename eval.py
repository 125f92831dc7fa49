"""eval.py -- judge a carb.py run: the model, saved predictions, CLIP's pseudo-masks; export and pictures.

    python eval.py --data synthetic --ckpt runs/synthetic/last.pth                    # the model on val
    python eval.py --ckpt RUN/last.pth --flip --scales 0.5 0.75 1.0 1.25 1.5 1.75     # + test-time augmentation
    python eval.py --pred-dir PRED --pred-format labelid                              # saved prediction PNGs
    python eval.py --clip --clip-scale 2 --clip-tiles 2                               # CLIP's pseudo-masks (Fig. 3)
    python eval.py --data cityscapes --split test --ckpt RUN/last.pth --save-dir SUB  # for the benchmark server
    python eval.py --images FRAMES --ckpt RUN/last.pth --save-dir OUT                 # any folder of images
    python eval.py --data camvid --ckpt runs/camvid/last.pth --vis VIS                # CamVid, WildDash2: the same

--ckpt, --pred-dir and --clip can be combined: each is a column of one table. --vis DIR writes a picture per image,
--json FILE the numbers. One confusion matrix per column is summed over the split (IoU = tp / (tp + fp + fn));
classes with neither GT nor predicted pixels are left out of the mean, as in the official Cityscapes evaluation.
The experiments take carb.py's training flags after their own:

    python eval.py --ablation [carb.py flags]    # the paper's Table 3: every variant, three seeds, one table
    python eval.py --benchmark [carb.py flags]   # the step's phases with the paper's networks, random weights

and `geometry()` prints the stand-in's sizes (README). eval.py imports carb; carb.py never imports eval.py.
"""
import argparse
import functools
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
import warnings
from glob import glob

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageColor, ImageDraw
from tqdm import tqdm

import carb

TRAIN_TO_LABEL = torch.zeros(256, dtype=torch.uint8)  # Cityscapes trainId -> labelId; void (255) -> 0 "unlabeled"
TRAIN_TO_LABEL[[c.train_id for c in carb.CITYSCAPES]] = torch.tensor([c.id for c in carb.CITYSCAPES], dtype=torch.uint8)
SUFFIX = {"trainid": "trainIds", "labelid": "labelIds", "color": "color"}  # --save-format -> file name suffix


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate, export and draw carb.py predictions and CLIP pseudo-masks.",
                                epilog="experiments: eval.py --ablation [carb.py's flags] (the paper's Table 3), "
                                "eval.py --benchmark [carb.py's flags] (the step's phases)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=list(carb.DEFAULTS), help="default: the --ckpt's, else synthetic")
    p.add_argument("--data-root", help="default: the dataset's carb.py default")
    p.add_argument("--split", default="val", help="a folder of leftImg8bit/ (img/ for camvid, wilddash2); scored "
                   "where it has labels (Cityscapes' test split: predicted, not scored)")
    p.add_argument("--images", metavar="DIR", help="instead of a split: every .png/.jpg in DIR (no ground truth)")
    p.add_argument("--ckpt", help="score (or predict with) a carb.py checkpoint, e.g. RUN/last.pth")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: also the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="test-time augmentation: scales whose logits are summed, e.g. 0.5 0.75 1.0 1.25 1.5 1.75")
    p.add_argument("--pred-dir", help="score saved prediction PNGs, found by the image id (e.g. city_seq_frame) in "
                   "the name")
    p.add_argument("--pred-format", choices=["trainid", "labelid"],
                   help="ids in --pred-dir PNGs; default: labelid for cityscapes/synthetic, trainid for the others")
    p.add_argument("--clip", action="store_true", help="score CLIP's pseudo-masks (restricted to the GT's classes)")
    p.add_argument("--clip-scale", type=float, default=1.0, help="also CLIP on the image up-scaled by this")
    p.add_argument("--clip-tiles", type=int, default=1, help="also CLIP on N x N tiles, stitched back")
    p.add_argument("--clip-model", help="default: the checkpoint's, else the dataset's carb.py default")
    p.add_argument("--dense-clip", nargs="+", choices=carb.DENSE_CLIP, help="with --clip: one column per last-block "
                   "variant of carb.maskclip_scores (default: the checkpoint's, else maskclip)")
    p.add_argument("--save-dir", help="write the predictions (of --ckpt, else of --pred-dir) as ID_SUFFIX.png")
    p.add_argument("--save-format", nargs="+", choices=list(SUFFIX),
                   help="default: labelid (what the Cityscapes server takes; trainid for camvid, wilddash2); "
                        "with --images: trainid color")
    p.add_argument("--vis", metavar="DIR", help="write one picture per image: image | CLIP | prediction | GT")
    p.add_argument("--premise", action="store_true", help="with --ckpt: CARB's premise on this split (R_c, R_i, "
                   "the pseudo-mask's accuracy in each, w); implies --clip")
    p.add_argument("--json", metavar="FILE", help="write per-class IoU, mIoU, pixel accuracy and pixel counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir", default=carb.get_args_parser().get_default("cache_dir"),
                   help="CLIP text embeddings are cached here")
    return p


def check_args(args, has_gt):
    where = "--images" if args.images else f"--split {args.split}"
    if not (args.ckpt or args.pred_dir or args.clip):
        raise carb.CarbError("nothing to evaluate: pass --ckpt, --pred-dir and/or --clip")
    if not has_gt and (args.pred_dir or args.clip):
        raise carb.CarbError(f"{where} has no ground truth to score --pred-dir or --clip against: use --split val")
    if not has_gt and not (args.ckpt and (args.save_dir or args.vis)):
        raise carb.CarbError(f"{where} has no ground truth: pass --ckpt with --save-dir and/or --vis")
    if args.save_dir and not (args.ckpt or args.pred_dir):
        raise carb.CarbError("--save-dir writes predictions: pass --ckpt or --pred-dir")
    if args.json and not has_gt:
        raise carb.CarbError(f"--json writes scores, but {where} has no ground truth to score against")
    if args.save_format and not args.save_dir:
        raise carb.CarbError("--save-format needs --save-dir")
    if args.clip_tiles < 1 or args.clip_scale <= 0 or min(args.scales) <= 0:
        raise carb.CarbError("--clip-tiles must be at least 1, --clip-scale and --scales positive")


def list_images(folder):
    if not os.path.isdir(folder):
        raise carb.CarbError(f"--images {folder} is not a folder")
    images = sorted(p for p in glob(os.path.join(folder, "*")) if p.lower().endswith((".png", ".jpg", ".jpeg")))
    if not images:
        raise carb.CarbError(f"--images {folder} holds no .png/.jpg files")
    return images


def load_model(path, device, data=None):
    """(Segmenter in eval mode, run args) of a checkpoint, built from its own --backbone; its text classifier is in
    its weights, so no CLIP is needed. It must be for the classes of `data` (default: the --data it was trained
    with); a checkpoint that does not fit is a one-line error."""
    ckpt = carb.load_checkpoint(path)
    state, backbone = ckpt["model"], ckpt["args"].get("backbone")
    trained_on = ckpt["args"].get("data", data or "cityscapes")  # a checkpoint without it: the classes of `data`
    data = data or trained_on
    if trained_on not in carb.DATASETS:
        raise carb.CarbError(f"--ckpt {path} was trained with --data {trained_on}, which this carb.py does not know "
                             f"({', '.join(carb.DATASETS)})")
    if carb.DATASETS[trained_on].classes != carb.DATASETS[data].classes:
        raise carb.CarbError(f"--ckpt {path} was trained with --data {trained_on}, whose classes are not those of "
                             f"--data {data}: pass --data {trained_on}")
    classes = carb.DATASETS[data].classes
    classifier = state.get("text_classifier")
    if classifier is None or classifier.ndim != 2 or classifier.shape[0] != len(classes):
        shape = None if classifier is None else list(classifier.shape)
        raise carb.CarbError(f"--ckpt {path} has a text classifier of shape {shape}: carb evaluates the "
                             f"{len(classes)} --data {data} classes, so it must be [{len(classes)}, D]")
    if backbone not in carb.BACKBONES:
        raise carb.CarbError(f"--ckpt {path} was trained with --backbone {backbone}, which this carb.py does not "
                             f"know ({', '.join(carb.BACKBONES)})")
    model = carb.Segmenter(backbone, classifier)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise carb.CarbError(f"--ckpt {path}: its weights do not fit a {backbone} Segmenter "
                             f"({str(e).splitlines()[-1].strip()[:160]})") from None
    return model.to(device).eval(), ckpt["args"]


@torch.no_grad()
def predict_tta(model, images, scales=(1.0,), flip=False):
    """Test-time augmentation, as CARB's fork of mmseg's aug_test: the raw logits (its inference() has the softmax
    commented out) summed over the scales and (with flip) their mirror images, each resized back to the image first.
    uint8 images [B,3,H,W] -> trainIds [B,H,W]."""
    x = TF.normalize(images.float() / 255, carb.IMAGENET_MEAN, carb.IMAGENET_STD)
    H, W = x.shape[-2:]
    total = 0
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, size=(round(H * s), round(W * s)), mode="bilinear", align_corners=False)
        for flipped in (False, True)[:1 + flip]:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                logits = model(xs.flip(-1) if flipped else xs)
            logits = F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False)
            total = total + (logits.flip(-1) if flipped else logits)
    return total.argmax(1)


def id_in(name, wanted):
    """The longest id of `wanted` in a file name, not as part of a longer run of letters or digits, else None:
    frankfurt_000000_000294 in pred_frankfurt_000000_000294.png, 0001TP_006690 in 0001TP_006690_trainIds.png."""
    runs = list(re.finditer(r"[A-Za-z0-9]+", name))
    hits = [name[a.start():b.end()] for i, a in enumerate(runs) for b in runs[i:] if name[a.start():b.end()] in wanted]
    return max(hits, key=len, default=None)


def match_predictions(pred_dir, ids, split):
    """The prediction PNG of each image, found by the image id anywhere in its name (in any sub-folder), as the
    official Cityscapes script finds them. Missing, extra and doubled files are errors that name the first culprit."""
    if not os.path.isdir(pred_dir):
        raise carb.CarbError(f"--pred-dir {pred_dir} is not a folder")
    found, extra, wanted = {}, [], set(ids)
    for path in sorted(glob(os.path.join(pred_dir, "**", "*.png"), recursive=True)):
        hit = id_in(os.path.basename(path), wanted)
        if hit is None:
            extra.append(path)
        elif hit in found:
            raise carb.CarbError(f"--pred-dir: two predictions for {hit} ({found[hit]}, {path}): keep one "
                                 "PNG per image (save each --save-format to its own folder)")
        else:
            found[hit] = path
    missing = [i for i in ids if i not in found]
    if missing:
        raise carb.CarbError(f"--pred-dir: {len(missing)} of {len(ids)} images of --split {split} have no prediction "
                             f"in {pred_dir} (first: {missing[0]}): write one PNG per image, named with its image id")
    if extra:
        raise carb.CarbError(f"--pred-dir: {len(extra)} PNG(s) in {pred_dir} are for no image of --split {split} "
                             f"(first: {extra[0]}): remove them, or pass the split they were made for")
    return [found[i] for i in ids]


def read_prediction(path, fmt, size, num_classes):
    """A prediction PNG of trainIds or (Cityscapes) labelIds -> trainIds uint8 [H,W] (255 = void, which scores as a
    miss)."""
    try:
        ids = np.array(Image.open(path))
    except (OSError, ValueError) as e:
        raise carb.CarbError(f"cannot read prediction {path} ({e})") from None
    if ids.ndim != 2:
        raise carb.CarbError(f"{path} has {ids.shape[-1]} channels: --pred-dir takes single-channel {fmt} PNGs, "
                             "not colour pictures")
    if ids.shape != tuple(size):
        raise carb.CarbError(f"{path} is {ids.shape[0]}x{ids.shape[1]} but its image is {size[0]}x{size[1]}: "
                             "predict at the image's full resolution")
    limit = {"trainid": num_classes, "labelid": 34}[fmt]  # legal ids: below this, or 255 (void)
    bad = ((ids < 0) | (ids >= limit)) & (ids != 255)
    if bad.any():
        other = {"trainid": "labelid", "labelid": "trainid"}[fmt]
        raise carb.CarbError(f"{path} holds {ids[bad][0]}, not a {fmt} (0-{limit - 1}, or 255 = void): "
                             f"check the file, or pass --pred-format {other} if that is what it holds")
    ids = torch.from_numpy(ids.astype(np.uint8))
    return carb.LABEL_TO_TRAIN[ids.long()] if fmt == "labelid" else ids


def clip_view(scorer, image, labels, scale, tiles):
    """CLIP's pseudo-mask [H,W] of one image seen as tiles x tiles windows, each up-scaled by `scale`, stitched back:
    the paper's Fig. 3 views -- (1, 1) original, (2, 1) resize x2, (1, 2) quarter crops, (2, 2) both."""
    x = TF.normalize(image[None].float() / 255, carb.CLIP_MEAN, carb.CLIP_STD)
    H, W = image.shape[-2:]
    ys, xs = [round(H * k / tiles) for k in range(tiles + 1)], [round(W * k / tiles) for k in range(tiles + 1)]
    mask = torch.empty(H, W, dtype=torch.long, device=image.device)
    for top, bottom in zip(ys, ys[1:]):
        for left, right in zip(xs, xs[1:]):
            window = (top, left, bottom - top, right - left, scale)
            mask[top:bottom, left:right] = carb.local_pseudo_mask(scorer, x, labels[None], window)[0]
    return mask


# The pictures' colours: Cityscapes' own; CamVid's SegNet palette and WildDash2's, as the official code draws them.
PALETTES = {"cityscapes": [c.color for c in carb.CITYSCAPES], "synthetic": [c.color for c in carb.CITYSCAPES],
            "camvid": [ImageColor.getrgb("#" + c) for c in "808080 800000 c0c080 804080 0000c0 808000 c08080 404080 "
                                                         "400080 404000 0080c0".split()],
            "wilddash2": [ImageColor.getrgb("#" + c) for c in "001432 804080 f423e8 464646 66669c be9999 b4a5b4 "
                          "999999 faaa1e dcdc00 6b8e23 98fb98 4682b4 dc143c ff0000 00008e 000046 003c64 0000e6 770b20 "
                          "280064 002878 ae4043 d2aa64 c4b080".split()]}


def colorize(mask, data="cityscapes"):
    """trainId mask [H,W] -> RGB uint8 [H,W,3] in the dataset's palette; void (255) black."""
    palette = torch.zeros(256, 3, dtype=torch.uint8)
    palette[:len(PALETTES[data])] = torch.tensor(PALETTES[data], dtype=torch.uint8)
    return palette[mask.cpu().long()]


def vis_strip(image, masks, data="cityscapes", title_h=16, legend_w=112, max_w=1024):
    """The image (uint8 [3,H,W]) and the masks ({title: [H,W]}) side by side, titled, then a legend of the classes."""
    H, W = image.shape[-2:]
    w, h = min(W, max_w), round(H * min(W, max_w) / W)
    panels = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((w, h), Image.BILINEAR)]
    panels += [Image.fromarray(colorize(m, data).numpy()).resize((w, h), Image.NEAREST) for m in masks.values()]
    classes, palette = carb.DATASETS[data].classes, PALETTES[data]
    present = sorted({c for m in masks.values() for c in m.unique().tolist() if c < len(classes)})
    per_row = max(1, len(panels) * w // legend_w)
    strip = Image.new("RGB", (len(panels) * w, title_h * (1 + math.ceil(len(present) / per_row)) + h), "white")
    draw = ImageDraw.Draw(strip)  # PIL's default font: no font file to ship
    for k, (title, panel) in enumerate(zip(["image", *masks], panels)):
        strip.paste(panel, (k * w, title_h))
        draw.text((k * w + 3, 2), title, fill="black")
    for n, c in enumerate(present):
        x, y = n % per_row * legend_w, title_h + h + n // per_row * title_h
        draw.rectangle((x + 3, y + 3, x + 13, y + 13), fill=palette[c], outline="black")
        draw.text((x + 17, y + 2), classes[c], fill="black")
    return strip


def runs(mask):
    """The lengths of the runs of True in each row of a boolean array."""
    steps = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    return np.nonzero(steps == -1)[1] - np.nonzero(steps == 1)[1]


def geometry(n=20, size=(256, 512), patch=4):
    """README, "the geometry": the stand-in's small classes over n synthetic train scenes -- the median width and
    height of their pixel runs, in pixels and in SimulatedCLIP patches at m = 1, 1.5 and 2 -- and their pixel share."""
    rng = np.random.default_rng([0, False])  # make_synthetic's train scenes
    labels = [carb.render_scene(rng, *size)[1] for _ in range(n)]
    header = "".join(f"{f'patches, m={m}':>18}" for m in (1, 1.5, 2))
    print(f"{'class':<15}{'w x h px':>12}{header}{'pixels':>8}")
    for label_id in (17, 19, 20, 24):  # pole, traffic light, traffic sign, person
        w = np.median(np.concatenate([runs(lab == label_id) for lab in labels]))
        h = np.median(np.concatenate([runs((lab == label_id).T) for lab in labels]))
        cells = "".join(f"{f'{w * m / patch:.1f} x {h * m / patch:.1f}':>18}" for m in (1, 1.5, 2))
        share = 100 * np.mean([(lab == label_id).mean() for lab in labels])
        print(f"{carb.SYNTH_COLORS[label_id][0]:<15}{f'{w:.0f} x {h:.0f}':>12}{cells}{share:>7.2f}%")


def save_prediction(mask, image_id, out_dir, formats, data):
    """trainIds [H,W] -> OUT/ID_trainIds.png, ID_labelIds.png (Cityscapes; void -> 0 "unlabeled") and/or
    ID_color.png."""
    mask = mask.cpu()
    for fmt in formats:
        pixels = {"trainid": mask.to(torch.uint8), "labelid": TRAIN_TO_LABEL[mask.long()],
                  "color": colorize(mask, data)}[fmt]
        Image.fromarray(pixels.numpy()).save(os.path.join(out_dir, f"{image_id}_{SUFFIX[fmt]}.png"))


def summarize(conf, class_names):
    """Per-class IoU, mIoU and pixel accuracy (in percent, None where undefined) and the pixel counts behind them,
    of one [C, C+1] confusion matrix (GT-ignored pixels are not in it)."""
    iou, conf = carb.iou_from_confusion(conf), conf.cpu()
    tp, labelled = conf.diagonal(), conf.sum().item()
    number = lambda v: None if math.isnan(v) else v  # noqa: E731  (JSON has no NaN)
    return {"miou": number(carb.mean_iou(iou)), "pixel_accuracy": 100 * tp.sum().item() / max(labelled, 1),
            "labelled_pixels": labelled,
            "classes": {name: {"iou": number(100 * iou[c].item()), "gt_pixels": conf[c].sum().item(),
                               "predicted_pixels": conf[:, c].sum().item(), "true_positives": tp[c].item()}
                        for c, name in enumerate(class_names)}}


def format_table(columns, class_names):
    """Aligned per-class IoU table, columns = {title: iou tensor}; classes in no column are left out."""
    widths = [max(14, len(t) + 2) for t in columns]
    lines = [f"{'class':<15}" + "".join(f"{t:>{n}}" for t, n in zip(columns, widths))]
    for i, name in enumerate(class_names):
        values = [c[i].item() for c in columns.values()]
        if not all(math.isnan(v) for v in values):
            lines.append(f"{name:<15}" + "".join(f"{'-' if math.isnan(v) else f'{100 * v:.2f}':>{n}}"
                                                 for v, n in zip(values, widths)))
    lines.append(f"{'mIoU':<15}" + "".join(f"{carb.mean_iou(c):>{n}.2f}" for c, n in zip(columns.values(), widths)))
    return "\n".join(lines)


def premise_counts(logits, mask, gt, labels, num_classes):
    """One image's premise counts, over its GT-labelled pixels, in carb.region_losses' own regions (R_c, R_i): pixels
    [2, C] and correct pixels [2, C] of each pseudo-mask class per region, and the CE sums [2] of the logits against
    the mask. logits [C,H,W], mask and gt [H,W], labels [C] (the image's classes)."""
    mask = mask.masked_fill(gt == 255, 255)
    ce_c, ce_i, consistent, inconsistent = carb.region_losses(logits[None], mask[None], labels[None])
    keep = mask != 255
    idx = (inconsistent[0].long() * num_classes + mask.long())[keep]
    pixels = torch.bincount(idx, minlength=2 * num_classes).reshape(2, num_classes)
    correct = torch.bincount(idx[(mask == gt)[keep]], minlength=2 * num_classes).reshape(2, num_classes)
    return pixels, correct, torch.stack([ce_c * consistent.sum(), ce_i * inconsistent.sum()])


def premise_report(pixels, correct, ce, class_names):
    """--premise: is R_c, where CLIP's pseudo-mask agrees with the model's label-restricted prediction P, the reliable
    region? The shares of R_c and R_i, the mask's accuracy in each (per class and overall), each class's share of its
    mask pixels in R_i, and the w a fresh RegionBalancer would give these CEs. Returns the figures."""
    pct = lambda a, b: 100 * a / b if b > 0 else math.nan  # noqa: E731
    pixels, correct, ce = pixels.double().cpu(), correct.double().cpu(), ce.double().cpu()
    n = pixels.sum(1)
    ce_mean = [ce[r].item() / max(n[r].item(), 1) for r in (0, 1)]
    figures = {"R_c share": pct(n[0], n.sum()).item(), "R_i share": pct(n[1], n.sum()).item(),
               "accuracy in R_c": pct(correct[0].sum(), n[0]).item(),
               "accuracy in R_i": pct(correct[1].sum(), n[1]).item(),
               "CE(R_c)": ce_mean[0], "CE(R_i)": ce_mean[1], "w": carb.RegionBalancer().update(*ce_mean)}
    print(f"premise: {int(n.sum())} GT-labelled pixels; R_c = {{pseudo-mask == P}}, P the model's label-restricted "
          "prediction")
    print(f"{'class':<15}{'mask pixels':>12}{'in R_i %':>10}{'acc R_c %':>11}{'acc R_i %':>11}")
    for k, name in enumerate(class_names):
        if pixels[:, k].sum() > 0:
            print(f"{name:<15}{int(pixels[:, k].sum()):>12}{pct(pixels[1, k], pixels[:, k].sum()):>10.1f}"
                  f"{pct(correct[0, k], pixels[0, k]):>11.1f}{pct(correct[1, k], pixels[1, k]):>11.1f}")
    print(f"{'all':<15}{int(n.sum()):>12}{figures['R_i share']:>10.1f}{figures['accuracy in R_c']:>11.1f}"
          f"{figures['accuracy in R_i']:>11.1f}")
    print(f"R_c {figures['R_c share']:.1f} % of the pixels, R_i {figures['R_i share']:.1f} %; CE(R_c) "
          f"{ce_mean[0]:.3f}, CE(R_i) {ce_mean[1]:.3f}: a fresh RegionBalancer's w = {figures['w']:.4f}")
    return figures


# The paper's component ablation (its Table 3), each variant a flag combination of the normal command line; first the
# oracle, the fully supervised upper bound. Every variant runs with the same seeds: the differences are paired.
ABLATION = [("oracle", "oracle: GT masks + CE", ["--oracle"]),
            ("a", "(a) global mask + CE", ["--no-local-view", "--carb-start", "ITERS"]),
            ("b", "(b) + Global-Local View", ["--carb-start", "ITERS"]),
            ("c", "(c) + CARB", ["--no-local-view"]),
            ("d", "(d) GLV + CARB (carb.py)", []),
            ("e", "(e) (d), fixed w = 0.03", ["--region-weight", "0.03"])]
ABLATION_SEEDS = (0, 1, 2)
ABLATION_ITERS = {"synthetic": 260}  # per run, so that 6 variants x 3 seeds fit in 60 minutes on 2 CPU cores
# --benchmark: the Cityscapes networks at a quarter of the official crop (and window), batch 2.
BENCHMARK = dict(crop=(256, 512), window=(256, 128), batch_size=2, backbone="resnet50", optimizer="sgd", lr=0.005)


def paired(results, names, seeds, base):
    """{name: (mean, std)} over `seeds` of results[name, seed] - results[base, seed], figure by figure."""
    diffs = {n: torch.tensor([[a - b for a, b in zip(results[n, s], results[base, s])] for s in seeds]) for n in names}
    return {n: (d.mean(0), d.std(0)) for n, d in diffs.items()}


def ablation(argv):
    """--ablation: every ABLATION variant with each seed, the same budget, through carb.main(); two tables."""
    began = time.perf_counter()
    given = carb.get_args_parser().parse_args(argv)  # as given; then with the defaults (the ablation sets
    args = carb.parse_args(argv + ["--carb-start", "0"])  # --carb-start itself, below)
    iters = given.iters or ABLATION_ITERS.get(args.data, args.iters)
    official = carb.DEFAULTS[args.data]  # the dataset's own warm-up ratio: Cityscapes 16000/30000, CamVid 4000/12000
    carb_start = given.carb_start if given.carb_start is not None else round(iters * official["carb_start"] /
                                                                              official["iters"])
    names = carb.DATASETS[args.data].classes
    small = [c for c, n in enumerate(names) if n.lower() in ("traffic light", "traffic sign", "pole", "signsymbol")]
    results = {}  # (variant, seed) -> [mIoU, the small classes' IoUs...]
    for seed, (tag, name, flags) in itertools.product(ABLATION_SEEDS, ABLATION):
        flags = [str(iters) if f == "ITERS" else f for f in flags] + ["--seed", str(seed)]
        out = os.path.join(args.out + "_ablation", f"{tag}_seed{seed}")
        print(f"\n=== ablation {name}: carb.py {shlex.join(flags)} --out {out}", flush=True)
        run_argv = argv + ["--iters", str(iters), "--val-every", str(iters), "--carb-start", str(carb_start)]
        ious = carb.main(carb.parse_args(run_argv + flags + ["--out", out]))
        results[name, seed] = [carb.mean_iou(ious["model"])] + [100 * ious["model"][c].item() for c in small]
    variants = [name for _, name, _ in ABLATION]
    print(f"\nablation: {args.data}, {iters} iterations per run, CARB from {carb_start}; pseudo-mask mIoU "
          f"{carb.mean_iou(ious['pseudo-mask']):.2f}; mean ± std over seeds {' '.join(map(str, ABLATION_SEEDS))}")

    def table(title, rows, sign=""):
        print(f"{title:<26}" + "".join(f"{c:>20}" for c in ["mIoU"] + [f"IoU {names[c]}" for c in small]))
        for name in variants:
            print(f"{name:<26}" + "".join(f"{f'{m:{sign}.2f} ± {s:.2f}':>20}" for m, s in zip(*rows[name])))
    runs = {n: torch.tensor([results[n, s] for s in ABLATION_SEEDS]) for n in variants}
    table("", {n: (r.mean(0), r.std(0)) for n, r in runs.items()})
    table("minus (a), seed by seed", paired(results, variants, ABLATION_SEEDS, ABLATION[1][1]), "+")
    minutes, seconds = divmod(round(time.perf_counter() - began), 60)
    print(f"ablation took {minutes} min {seconds} s ({len(results)} runs)")
    return results


def benchmark(argv, steps=3):
    """--benchmark: --profile's stopwatch over a few steps of the paper's networks, CLIP ViT-B/16 and DeepLabV3
    (--backbone) with random weights, on a random batch: no data, no downloads. The first step warms up."""
    args = carb.parse_args(argv, defaults=BENCHMARK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip imports pkg_resources
        import clip
    device, (H, W), B, C = torch.device(args.device), args.crop, args.batch_size, len(carb.CLASS_NAMES)
    torch.manual_seed(args.seed)
    clip_model = clip.model.build_model(clip.model.CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12).state_dict())
    clip_model = clip_model.to(device).float().requires_grad_(False)  # ViT-B/16's shapes; fp32, as carb.load_clip
    classifier = F.normalize(torch.randn(C, 512), dim=-1)
    scorer = functools.partial(carb.maskclip_scores, clip_model, text_classifier=classifier.to(device))
    model, optimizer, balancer = carb.make_model(args, classifier, device)
    batch = (torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8), (torch.rand(B, C) < 0.5).float(),
             torch.tensor([[H, W]] * B))
    watch = carb.Stopwatch(device)
    for step in tqdm(range(steps + 1), desc="benchmark", leave=False):
        window = carb.sample_window(args.crop, args.window, *args.multiplier, torch.Generator().manual_seed(step))
        if step == 1:  # the first step warms up
            watch.totals.clear()
        carb.train_one_step(model, optimizer, scorer, batch, window, True, balancer, device, watch)
    print(f"benchmark: DeepLabV3-{args.backbone} + CLIP ViT-B/16, random weights, {device.type} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}; crop {H}x{W}, batch {B}, window "
          f"{window[2]}x{window[3]}; {steps} steps after a warm-up step")
    print(watch.table(steps))
    t = watch.totals
    step = sum(t[p] for p in carb.Stopwatch.STEP)
    unavoidable = t["CLIP global"] + t["CLIP local"] + t["segmentation forward+backward"] + t["optimizer"]
    print(f"step/unavoidable: {step / unavoidable:.2f}")
    print(f"carb share: {100 * t['CARB loss and balancer'] / step:.1f}%")


@torch.no_grad()
def main(args):
    device = torch.device(args.device)
    model, ckpt_args = load_model(args.ckpt, device, args.data) if args.ckpt else (None, {})
    args.data = args.data or ckpt_args.get("data") or "synthetic"
    ds = carb.DATASETS[args.data]
    C = len(ds.classes)
    label_ids = ds is carb.DATASETS["cityscapes"]  # labelIds (the Cityscapes benchmark's format) exist only there
    args.pred_format = args.pred_format or ("labelid" if label_ids else "trainid")
    formats = args.save_format or (["trainid", "color"] if args.images else ["labelid" if label_ids else "trainid"])
    if not label_ids and "labelid" in formats + [args.pred_format]:
        raise carb.CarbError(f"labelid is the Cityscapes benchmark's format: --data {args.data} predictions are "
                             f"written and read as trainid (class indices 0-{C - 1}, 255 = void) or color")
    if args.images:
        images, gts = list_images(args.images), None
    else:
        root = args.data_root or carb.DEFAULTS[args.data]["data_root"]
        images, gts = carb.list_split(root, args.split, args.data)
        label_dir = os.path.dirname(os.path.join(root, ds.labels.format(split=args.split)).split("*")[0])
        if (label_ids and args.split == "test") or not os.path.isdir(label_dir):
            gts = None  # Cityscapes' test labels are placeholders; a split without its label folder has none
        else:
            carb.check_pairs(images, gts)
    if args.premise and not (args.ckpt and gts):
        raise carb.CarbError("--premise compares CLIP's masks with a model on GT: pass --ckpt and a labelled split")
    args.clip = args.clip or args.premise
    check_args(args, gts is not None)
    ids = [carb.image_id(p) for p in images]
    # The columns: title -> f(image uint8 [3,H,W] on the device, GT's classes [C] or None, index) -> trainIds [H,W]
    views = {}
    if args.clip or (args.vis and gts):  # a picture shows CLIP's pseudo-mask (and so its score) where there is GT
        args.clip_model = args.clip_model or ckpt_args.get("clip_model") or carb.DEFAULTS[args.data]["clip_model"]
        variants = args.dense_clip or [ckpt_args.get("dense_clip", "maskclip")]
        if args.clip_model == "simulated" and variants != ["maskclip"]:
            raise carb.CarbError("--dense-clip changes CLIP's attention, which --clip-model simulated has not")
        scorer, _ = carb.build_scorer(argparse.Namespace(**vars(args) | {"dense_clip": "maskclip"}), device)
        for variant in variants:  # a column per variant: "pseudo-mask" alone for the default
            name = "pseudo-mask" if variants == ["maskclip"] else f"pseudo-mask {variant}"
            view = scorer if variant == "maskclip" else functools.partial(scorer, variant=variant)
            views[name] = lambda image, labels, i, view=view: clip_view(view, image, labels, 1.0, 1)
            if (args.clip_scale, args.clip_tiles) != (1, 1):
                views[f"{name} x{args.clip_scale:g} {args.clip_tiles}x{args.clip_tiles}"] = \
                    lambda image, labels, i, view=view: clip_view(view, image, labels, args.clip_scale, args.clip_tiles)
    if model is not None:
        views["model"] = lambda image, labels, i: carb.predict(model, image[None])[0]
        if args.flip or args.scales != [1.0]:  # reported beside the single-scale number, never instead of it
            views["model TTA"] = lambda image, labels, i: predict_tta(model, image[None], args.scales, args.flip)[0]
    if args.pred_dir:
        pred_files = match_predictions(args.pred_dir, ids, args.split)
        views["predictions"] = lambda image, labels, i: \
            read_prediction(pred_files[i], args.pred_format, image.shape[-2:], C).to(device)
    saved = "model TTA" if "model TTA" in views else "model" if model is not None else "predictions"
    for folder in (args.save_dir, args.vis):
        if folder:
            os.makedirs(folder, exist_ok=True)

    conf = {title: torch.zeros(C, C + 1, dtype=torch.long, device=device) for title in views}
    premise = None  # --premise: the counts of premise_counts, summed over the split
    loader = torch.utils.data.DataLoader(carb.EvalSet(images, gts, args.data), batch_size=None,
                                         num_workers=args.workers)
    for i, (image, gt) in enumerate(tqdm(loader, desc="images" if args.images else args.split)):
        image = image.to(device)
        gt = None if gt is None else gt.to(device)
        labels = None if gt is None else carb.present_classes(gt, C)
        masks = {title: view(image, labels, i) for title, view in views.items()}
        if args.premise:
            x = TF.normalize(image[None].float() / 255, carb.IMAGENET_MEAN, carb.IMAGENET_STD)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                counts = premise_counts(model(x)[0].float(), next(iter(masks.values())), gt, labels, C)
            premise = counts if premise is None else [a + b for a, b in zip(premise, counts)]
        if gt is not None:
            for title, mask in masks.items():
                conf[title] += carb.confusion_matrix(mask, gt, C)
        if args.save_dir:
            save_prediction(masks[saved], ids[i], args.save_dir, formats, args.data)
        if args.vis:
            vis_strip(image, masks | ({} if gt is None else {"GT": gt}), args.data).save(
                os.path.join(args.vis, ids[i] + ".png"))
    results = None
    if gts is not None:
        results = {title: summarize(c, ds.classes) for title, c in conf.items()}
        print(format_table({title: carb.iou_from_confusion(c) for title, c in conf.items()}, ds.classes))
        if args.data == "synthetic":
            print("(synthetic stand-in data: these are not Cityscapes results)")
        if "model TTA" in views:
            print(f"model TTA: scales {' '.join(f'{s:g}' for s in args.scales)}{', flip' if args.flip else ''}")
        for title, r in results.items():
            print(f"{title} pixel accuracy: {r['pixel_accuracy']:.2f}")
        for title, r in results.items():  # last, the paper's numbers; None only if no GT pixel of the split is labelled
            print(f"{title} mIoU: {'-' if r['miou'] is None else format(r['miou'], '.2f')}")
        if args.premise:
            results["premise"] = premise_report(*premise, ds.classes)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"split": args.split, "images": len(images), "results": results}, f, indent=1)
    for what, folder in (("predictions", args.save_dir), ("pictures", args.vis)):
        if folder:
            print(f"wrote {len(images)} images' {what} to {folder}")
    return results


EXPERIMENTS = {"--ablation": ablation, "--benchmark": benchmark}  # each takes carb.py's training flags

if __name__ == "__main__":
    experiment = next((a for a in sys.argv[1:] if a in EXPERIMENTS), None)
    if experiment:
        carb.run([a for a in sys.argv[1:] if a != experiment], EXPERIMENTS[experiment])
    else:
        try:
            main(get_args_parser().parse_args())
        except carb.CarbError as e:
            print(f"eval.py: error: {e}", file=sys.stderr)
            sys.exit(2)
