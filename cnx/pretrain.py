"""`cnx pretrain-tiny OUT_DIR`: train the tiny stand-in SVD on synthetic dancers, on a CPU.

The random-weight stand-in (`cnx.tiny`) exercises every code path but has
nothing to fine-tune: its VAE cannot reconstruct a frame and its UNet knows no
video. This command trains one that plays the part of the pretrained SVD that
ControlNeXt training starts from, with the same component classes and configs
as `cnx.tiny.write_tiny_svd`, in two stages on fresh synthetic clips
(`cnx.synth`: a new random dancer for every clip of every step):

1. the VAE (`cnx.pretrain_vae`): reconstruction of frames and of short clips by its
   temporal decoder, scored by PSNR on held-out dancers;
2. the UNet as an image-to-video model without pose (`cnx.pretrain_unet`): SVD's objective
   exactly as `cnx.step.training_step` computes it, with the trained VAE and the stand-in's
   CLIP encoder frozen, scored by the loss on a fixed held-out batch.

What both share (settings, clips, schedule, precision) is `cnx.pretrain_recipe`; the
workarounds for oneDNN's CPU kernels that the bf16 steps need are `cnx.cpu_kernels`. A
non-finite training loss stops the run, naming the stage and the step, before anything is
written. Both models are stored in half precision (`cast_weights`) to keep the folder small,
with `save_pretrained` (safetensors) plus README.md (`cnx.pretrain_card`) and
pretrain_report.json.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cnx import edm, flags
from cnx.pretrain_card import command_line, readme
from cnx.pretrain_recipe import PretrainConfig, cast_weights, heldout_sets
from cnx.pretrain_unet import train_unet
from cnx.pretrain_vae import latent_scaling_factor, train_vae
from cnx.tiny import save_svd_folder


def pretrain(out_dir: str | Path, config: PretrainConfig | None = None, progress: bool = True) -> dict:
    """Train both stages and write the pipeline folder, README.md and pretrain_report.json; the report.

    `config` defaults to `PretrainConfig()`. Raises FloatingPointError, writing nothing, at the
    first non-finite training loss or when a trained model holds a non-finite weight.
    """
    from cnx.tiny import build_tiny_components, folder_size

    out_dir, config = Path(out_dir), config or PretrainConfig()
    if problems := config.problems():
        raise ValueError("; ".join(problems))
    with torch.random.fork_rng():  # nothing here draws from the global RNG; leave it as it was anyway
        unet, vae, image_encoder, scheduler = build_tiny_components(
            config.seed, config.unet_width, config.vae_width, config.num_frames, config.unet_inner_width
        )
        image_encoder.requires_grad_(False).eval()
        heldout_frames, heldout_clips = heldout_sets(config)

        started = time.perf_counter()
        vae_report = train_vae(vae, config, heldout_frames, progress)
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, heldout_frames))
        vae_seconds = time.perf_counter() - started

        started = time.perf_counter()
        unet_report = train_unet(unet, vae, image_encoder, config, heldout_clips, progress)
        unet_seconds = time.perf_counter() - started

    for name, model in (("VAE", vae), ("UNet", unet)):
        if bad := [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]:
            raise FloatingPointError(f"the trained {name} has {len(bad)} non-finite weights, {bad[0]} first")
        if config.float16:
            cast_weights(model, torch.float16)
    save_svd_folder(out_dir, unet, vae, image_encoder, scheduler)
    report = {
        "config": asdict(config),
        "vae": vae_report
        | {
            "steps": config.vae_steps,
            "seconds": round(vae_seconds, 1),
            "scaling_factor": vae.config.scaling_factor,
        },
        "unet": unet_report | {"steps": config.unet_steps, "seconds": round(unet_seconds, 1)},
        "heldout": {
            "clips": config.heldout_clips,
            "sigmas": edm.lognormal_quantiles(config.heldout_sigmas).tolist(),
        },
        "command": command_line(out_dir, config),
    }
    (out_dir / "README.md").write_text(readme(report))
    report["weights_and_readme_bytes"] = folder_size(out_dir)
    (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser():
    """OUT_DIR and one flag per PretrainConfig field (`cnx.flags`: `--bf16` / `--no_bf16`)."""
    parser = flags.build_parser(PretrainConfig, "cnx pretrain-tiny", __doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline into")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Path, PretrainConfig]:
    """(OUT_DIR, settings); a bad flag or setting: one line `cnx pretrain-tiny: ...`, exit status 2."""
    try:
        args = vars(build_parser().parse_args(argv))
        out_dir, config = args.pop("out_dir"), PretrainConfig(**args)
        if problems := config.problems():
            raise ValueError("; ".join(problems))
    except ValueError as err:
        print(f"cnx pretrain-tiny: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return out_dir, config


def main(argv: list[str] | None = None) -> int:
    from cnx.profiles import cpu_has_bfloat16, quiet_known_warnings
    from cnx.tiny import folder_size

    out_dir, config = parse_args(argv)
    quiet_known_warnings()
    if config.bf16 and not cpu_has_bfloat16():
        print(
            "note: this CPU has no native bfloat16 (avx512_bf16 / amx_bf16), so --bf16 is emulated "
            "and slower than float32 here; --no_bf16 trains in float32 (results differ slightly)"
        )
    started = time.perf_counter()
    try:
        report = pretrain(out_dir, config)
    except FloatingPointError as err:
        print(f"cnx pretrain-tiny: {err}", file=sys.stderr)
        return 1
    vae, unet = report["vae"], report["unet"]
    print(
        f"pretrained tiny SVD: {out_dir} ({folder_size(out_dir) / 1e6:.1f} MB, "
        f"{time.perf_counter() - started:.0f} s); VAE held-out PSNR {vae['heldout_psnr']:.2f} dB, "
        f"UNet held-out loss {unet['heldout_loss_start']:.4f} -> {unet['heldout_loss_end']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
