"""`fewstep import` and `fewstep export`: foreign teachers in, students out."""
from __future__ import annotations

from fewstep import api
from fewstep import argtypes as A
from fewstep.cli.common import COMMAND_HELP


def register(sub):
    p = sub.add_parser("import", help=COMMAND_HELP["import"],
                       description="Convert a foreign teacher into a fewstep checkpoint folder. An EDM .pkl is read "
                                   "with an allow-list unpickler (its embedded code is never run) and rebuilt by "
                                   "fewstep's own implementation of EDM's networks.")
    p.add_argument("source", help="a diffusers folder (model_index.json, or unet/ + scheduler/) or an EDM .pkl")
    p.add_argument("--out", required=True, type=A.folder, help="the checkpoint folder to write")
    p.add_argument("--feature-layer", default=None,
                   help="name of the sub-module whose output is the network's hidden features (SFDDM's "
                        "feature loss); default: the last decoder block of the architecture")
    p.add_argument("--resolution", type=A.resolution, default=None,
                   help="a flow-matching pipeline's image side in pixels (Flux: default 1024 at an 8x autoencoder, "
                        "its shift follows it; SD3: its transformer's own)")
    p.set_defaults(func=cmd_import)

    e = sub.add_parser("export", help=COMMAND_HELP["export"],
                       description="Export a fewstep checkpoint as a diffusers pipeline folder whose sampler "
                                   "reproduces `fewstep sample` (grid, AFS, NFE).")
    e.add_argument("model", help="checkpoint folder or built-in name")
    e.add_argument("--format", default="diffusers", choices=["diffusers"])
    e.add_argument("--nfe", type=A.nfe, default=None, help="for an SFD-v model: which of its trained NFEs")
    e.add_argument("--out", required=True, type=A.folder, help="the folder to write")
    e.set_defaults(func=cmd_export)


def cmd_import(args):
    model = api.import_model(args.source, args.out, feature_layer=args.feature_layer, resolution=args.resolution)
    print(f"imported {args.source} → {model.path} (see: fewstep info {model.path})")


def cmd_export(args):
    out = api.export_model(args.model, args.out, nfe=args.nfe, format=args.format)
    print(f"exported {args.model} → {out} (diffusers: DiffusionPipeline.from_pretrained({str(out)!r}, "
          "custom_pipeline=…/pipeline.py, trust_remote_code=True); see its README.md)")
