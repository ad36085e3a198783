"""`egcmf predict-wsi | extract-rois | synth-slides`: argument parsing over library functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def _default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def add_wsi_commands(sub: argparse._SubParsersAction) -> None:
    from .options import ExtractOptions, SlidePairSpec, WsiOptions

    p = sub.add_parser("predict-wsi", help="segment a whole slide (pair): GeoJSON, TIFFs, report")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a checkpoint of egcmf train or of a federation (best.pt)")
    p.add_argument("--he", type=Path, required=True, help="H&E slide (SVS, NDPI, TIFF, ...)")
    p.add_argument("--ck56", type=Path, help="CK5/6 slide of the same block (edge variants)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for prediction.geojson, the TIFFs, thumbnail and report")
    _slide_args(p, WsiOptions)
    p.add_argument("--overlap", type=float, default=_default(WsiOptions, "overlap"),
                   help="share of a tile its neighbours overlap (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=_default(WsiOptions, "batch_size"),
                   help="tiles per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")
    p.set_defaults(func=_predict_wsi)

    p = sub.add_parser("extract-rois", help="cut an annotated slide pair into a site folder")
    p.add_argument("--he", type=Path, required=True, help="H&E slide")
    p.add_argument("--ck56", type=Path, help="CK5/6 slide of the same block")
    p.add_argument("--annotations", type=Path, required=True,
                   help="QuPath GeoJSON export or ASAP XML, level-0 pixel coordinates")
    p.add_argument("--out", type=Path, required=True, help="site folder to write")
    p.add_argument("--classes", default=",".join(_default(ExtractOptions, "classes")),
                   help="class names in id order (default: %(default)s)")
    p.add_argument("--class-map", default="", metavar="NAME=CLASS,...",
                   help="rename annotation classes, e.g. 'Tumor=invasive,DCIS=in_situ'")
    p.add_argument("--roi-size", type=int, default=_default(ExtractOptions, "roi_size"),
                   help="largest ROI side in 40x pixels; larger areas are tiled "
                        "(default: %(default)s)")
    p.add_argument("--name", help="site name in site.yaml (default: the folder's name)")
    p.add_argument("--seed", type=int, default=_default(ExtractOptions, "seed"),
                   help="seed of the train/val/test split (default: %(default)s)")
    _slide_args(p, ExtractOptions)
    p.set_defaults(func=_extract_rois)

    p = sub.add_parser("synth-slides", help="write a synthetic H&E/CK5/6 slide pair to try")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=SlidePairSpec.size,
                   help="level-0 side in pixels (default: %(default)s)")
    p.add_argument("--format", choices=("svs", "tiff"), default=SlidePairSpec.fmt)
    p.add_argument("--shift", type=int, nargs=2, default=list(SlidePairSpec.shift),
                   metavar=("DY", "DX"), help="CK5/6 offset in level-0 px (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SlidePairSpec.seed)
    p.set_defaults(func=_synth_slides)


def _slide_args(p: argparse.ArgumentParser, options: type) -> None:
    p.add_argument("--mpp", type=float, help="level-0 µm per pixel, for slides whose metadata "
                   "has none (e.g. 0.25 for 40x)")
    p.add_argument("--max-registration-error", type=float,
                   default=_default(options, "max_registration_error"),
                   help="µm; a CK5/6 registration estimated worse is refused "
                        "(default: %(default)s)")
    p.add_argument("--accept-registration", action="store_true",
                   help="go on with a registration flagged as doubtful")


def _predict_wsi(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model
    from ..engine import pick_device
    from .options import WsiOptions
    from .predict_wsi import predict_wsi

    device = pick_device(args.device)
    model, _, classes, _ = load_model(args.checkpoint, device)
    options = WsiOptions(mpp=args.mpp, overlap=args.overlap, batch_size=args.batch_size,
                         max_registration_error=args.max_registration_error,
                         accept_registration=args.accept_registration)
    report = predict_wsi(model, classes, args.he, args.ck56, args.out, device, options,
                         str(args.checkpoint))
    print(json.dumps({"out": str(args.out), "tiles": report["tiles"]["run"],
                      "tiles_per_s": report["tiles_per_s"],
                      "class_areas_mm2": report["class_areas_mm2"]}))
    return 0


def _extract_rois(args: argparse.Namespace) -> int:
    from .annotations import parse_class_map
    from .extract import extract_rois
    from .options import ExtractOptions

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    options = ExtractOptions(classes=classes, class_map=parse_class_map(args.class_map),
                             roi_size=args.roi_size, seed=args.seed, mpp=args.mpp,
                             max_registration_error=args.max_registration_error,
                             accept_registration=args.accept_registration)
    summary = extract_rois(args.he, args.ck56, args.annotations, args.out, options, args.name)
    print(json.dumps(summary))
    return 0 if not summary["problems"] else 1


def _synth_slides(args: argparse.Namespace) -> int:
    from .options import SlidePairSpec
    from .synthetic import write_slide_pair

    spec = SlidePairSpec(size=args.size, fmt=args.format, shift=tuple(args.shift),
                         seed=args.seed)
    paths = write_slide_pair(args.out, spec)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
