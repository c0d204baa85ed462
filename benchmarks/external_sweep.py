"""Sweep models from the libraries users train with: HF transformers, segmentation_models_pytorch and MONAI.

Not part of the test suite. Every model is built with random weights from its own classes (HF models
from their config classes, ``encoder_weights=None`` for smp): nothing is downloaded. A family whose
library is not installed is left out. For each model, as ``zoo_sweep.py`` does (its helpers run here):

* the strict table (ok, refused at a named operation, a ``TraceError``, or a crash of the engine), and
  the lenient one, whose flagged rows must start where strict mode refuses;
* boxes against gradient truth on the linearized twin, for a sample of units of a sample of rows, in
  1, 2 or 3 dimensions (a box equal to the support; inside it but smaller; outside it);
* the maps: ``receptive_maps`` on two random probes at the default layers must give finite maps,
  boxes inside the input and both ERF fractions in [0, 1]; warnings (a channel sum that does not
  depend on the input) are counted.

    python benchmarks/external_sweep.py                              # every family that is installed
    python benchmarks/external_sweep.py --sources smp monai          # some of them
    python benchmarks/external_sweep.py --models hf:pvt smp:pspnet/resnet18 monai:unet-3d --jsonl sweep.jsonl
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from zoo_sweep import _read, add_options, line, sweep_models, sweep_one
from zoo_sweep import summary as zoo_summary

from rf_callback import receptive_fields, receptive_maps

SOURCES = {"hf": "transformers", "smp": "segmentation_models_pytorch", "monai": "monai"}
IMAGE, VOLUME, SIGNAL = (3, 128, 128), (1, 32, 32, 32), (1, 8000)


class Channelless(nn.Module):
    """A model that takes its input without a channel dimension: raw audio ``(N, L)``, a spectrogram ``(N, frames,
    bins)`` (AST); given ``(N, 1, ...)`` as every model here is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x[:, 0])


# --------------------------------------------------------------------------------------------
# The catalogue: source:name -> () -> (model, input shape without the batch)
# --------------------------------------------------------------------------------------------


def hugging_face() -> dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]]:
    import transformers as t

    stages = {"depths": [1, 1, 1, 1]}
    four = ["stage1", "stage2", "stage3", "stage4"]
    small_vit = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    audio = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    audio |= {"conv_dim": (16,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}

    def vision(model: Any, config: Any, shape: tuple[int, ...] = IMAGE) -> Callable[[], tuple[nn.Module, tuple]]:
        return lambda: (model(config()), shape)

    def waveform(model: Any, config: Any, **options: Any) -> Callable[[], tuple[nn.Module, tuple]]:
        return lambda: (Channelless(model(config(**(audio | options)))), SIGNAL)

    convnext = {"hidden_sizes": [16, 32, 64, 128], **stages}
    return {
        "hf:resnet": vision(
            t.ResNetModel, lambda: t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], **stages)
        ),
        "hf:convnext": vision(t.ConvNextModel, lambda: t.ConvNextConfig(**convnext)),
        "hf:convnextv2": vision(t.ConvNextV2Model, lambda: t.ConvNextV2Config(**convnext)),
        "hf:efficientnet": vision(
            t.EfficientNetModel,
            lambda: t.EfficientNetConfig(image_size=128, width_coefficient=0.5, depth_coefficient=0.5, hidden_dim=640),
        ),
        "hf:mobilenet_v1": vision(t.MobileNetV1Model, lambda: t.MobileNetV1Config(depth_multiplier=0.25)),
        "hf:mobilenet_v2": vision(t.MobileNetV2Model, lambda: t.MobileNetV2Config(depth_multiplier=0.35)),
        "hf:mobilenet_v2_deeplab": vision(
            t.MobileNetV2ForSemanticSegmentation, lambda: t.MobileNetV2Config(depth_multiplier=0.35, num_labels=3)
        ),
        "hf:mobilevit": vision(
            t.MobileViTModel,
            lambda: t.MobileViTConfig(
                image_size=128, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 24, 32, 40, 160]
            ),
        ),
        "hf:mobilevit_deeplab": vision(
            t.MobileViTForSemanticSegmentation,
            lambda: t.MobileViTConfig(
                image_size=128,
                hidden_sizes=[32, 48, 64],
                neck_hidden_sizes=[8, 8, 16, 24, 32, 40, 160],
                aspp_out_channels=32,
                num_labels=3,
            ),
        ),
        "hf:mobilevitv2": vision(t.MobileViTV2Model, lambda: t.MobileViTV2Config(image_size=128, width_multiplier=0.5)),
        "hf:regnet": vision(
            t.RegNetModel,
            lambda: t.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], groups_width=8, **stages),
        ),
        "hf:bit": vision(
            t.BitModel, lambda: t.BitConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], num_groups=8, **stages)
        ),
        "hf:poolformer": vision(
            t.PoolFormerModel, lambda: t.PoolFormerConfig(hidden_sizes=[16, 32, 64, 128], **stages)
        ),
        "hf:segformer": vision(
            t.SegformerForSemanticSegmentation,
            lambda: t.SegformerConfig(hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=32, num_labels=3),
        ),
        "hf:upernet_convnext": vision(
            t.UperNetForSemanticSegmentation,
            lambda: t.UperNetConfig(
                backbone_config=t.ConvNextConfig(out_features=four, **convnext),
                hidden_size=32,
                auxiliary_in_channels=64,
                num_labels=3,
            ),
        ),
        "hf:upernet_swin": vision(
            t.UperNetForSemanticSegmentation,
            lambda: t.UperNetConfig(
                backbone_config=t.SwinConfig(
                    embed_dim=16, num_heads=[1, 2, 2, 4], window_size=4, out_features=four, **stages
                ),
                hidden_size=32,
                auxiliary_in_channels=64,
                num_labels=3,
            ),
        ),
        "hf:swin": vision(
            t.SwinModel,
            lambda: t.SwinConfig(image_size=128, embed_dim=16, num_heads=[1, 2, 2, 4], window_size=4, **stages),
        ),
        "hf:swinv2": vision(
            t.Swinv2Model,
            lambda: t.Swinv2Config(image_size=128, embed_dim=16, num_heads=[1, 2, 2, 4], window_size=4, **stages),
        ),
        "hf:swin2sr": vision(
            t.Swin2SRModel,
            lambda: t.Swin2SRConfig(image_size=32, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
            (3, 32, 32),
        ),
        "hf:pvt": vision(
            t.PvtModel,
            lambda: t.PvtConfig(
                image_size=128, hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 1, 2, 2], **stages
            ),
        ),
        "hf:pvt_v2": vision(
            t.PvtV2Model,
            lambda: t.PvtV2Config(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 1, 2, 2], **stages),
        ),
        "hf:focalnet": vision(t.FocalNetModel, lambda: t.FocalNetConfig(image_size=128, embed_dim=16, **stages)),
        "hf:levit": vision(
            t.LevitModel,
            lambda: t.LevitConfig(
                image_size=128,
                hidden_sizes=[32, 48, 64],
                depths=[1, 1, 1],
                num_attention_heads=[1, 2, 2],
                key_dim=[8, 8, 8],
            ),
        ),
        "hf:cvt": vision(t.CvtModel, lambda: t.CvtConfig(embed_dim=[16, 32, 64], num_heads=[1, 2, 2], depth=[1, 2, 3])),
        "hf:vit": vision(t.ViTModel, lambda: t.ViTConfig(image_size=128, **small_vit)),
        "hf:deit": vision(t.DeiTModel, lambda: t.DeiTConfig(image_size=128, **small_vit)),
        "hf:beit": vision(
            t.BeitModel, lambda: t.BeitConfig(image_size=128, use_relative_position_bias=True, **small_vit)
        ),
        "hf:data2vec_vision": vision(
            t.Data2VecVisionModel, lambda: t.Data2VecVisionConfig(image_size=128, **small_vit)
        ),
        "hf:dinov2": vision(t.Dinov2Model, lambda: t.Dinov2Config(image_size=128, patch_size=16, **small_vit)),
        "hf:dinov2_registers": vision(
            t.Dinov2WithRegistersModel, lambda: t.Dinov2WithRegistersConfig(image_size=128, patch_size=16, **small_vit)
        ),
        "hf:dpt": vision(
            t.DPTForDepthEstimation,
            lambda: t.DPTConfig(
                image_size=128,
                patch_size=16,
                num_hidden_layers=4,
                hidden_size=64,
                num_attention_heads=2,
                intermediate_size=128,
                neck_hidden_sizes=[16, 32, 64, 64],
                fusion_hidden_size=32,
                backbone_out_indices=[0, 1, 2, 3],
            ),
        ),
        "hf:glpn": vision(
            t.GLPNForDepthEstimation,
            lambda: t.GLPNConfig(
                hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32, **stages
            ),
        ),
        "hf:hiera": vision(
            t.HieraModel,
            lambda: t.HieraConfig(embed_dim=16, num_heads=[1, 1, 2, 2], image_size=[128, 128], **stages),
            IMAGE,
        ),
        "hf:textnet": vision(t.TextNetModel, lambda: t.TextNetConfig()),
        "hf:rt_detr_resnet": vision(
            t.RTDetrResNetBackbone,
            lambda: t.RTDetrResNetConfig(
                embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], out_features=four
            ),
        ),
        "hf:hgnet_v2": vision(t.HGNetV2Backbone, lambda: t.HGNetV2Config(out_features=four)),
        "hf:mask2former": vision(
            t.Mask2FormerModel,
            lambda: t.Mask2FormerConfig(
                backbone_config=t.SwinConfig(embed_dim=16, num_heads=[1, 1, 2, 2], out_features=four, **stages),
                hidden_dim=32,
                mask_feature_size=32,
                feature_size=32,
                encoder_layers=1,
                decoder_layers=2,
                num_queries=10,
                encoder_feedforward_dim=64,
                dim_feedforward=64,
                num_attention_heads=2,
            ),
        ),
        "hf:ast": lambda: (
            Channelless(t.ASTModel(t.ASTConfig(**small_vit, max_length=128, num_mel_bins=64))),
            (1, 128, 64),
        ),
        "hf:wav2vec2": waveform(t.Wav2Vec2Model, t.Wav2Vec2Config),
        "hf:wav2vec2_layer_norm": waveform(t.Wav2Vec2Model, t.Wav2Vec2Config, feat_extract_norm="layer"),
        "hf:hubert": waveform(t.HubertModel, t.HubertConfig),
        "hf:wavlm": waveform(t.WavLMModel, t.WavLMConfig),
        "hf:data2vec_audio": waveform(t.Data2VecAudioModel, t.Data2VecAudioConfig),
        "hf:unispeech": waveform(t.UniSpeechModel, t.UniSpeechConfig),
        "hf:unispeech_sat": waveform(t.UniSpeechSatModel, t.UniSpeechSatConfig),
        "hf:sew": waveform(t.SEWModel, t.SEWConfig, conv_dim=(16,) * 13),
        "hf:sew_d": waveform(t.SEWDModel, t.SEWDConfig, conv_dim=(16,) * 13),
        "hf:wav2vec2_conformer": waveform(t.Wav2Vec2ConformerModel, t.Wav2Vec2ConformerConfig),
        "hf:whisper_encoder": lambda: (
            t.WhisperModel(
                t.WhisperConfig(
                    d_model=32,
                    encoder_layers=1,
                    decoder_layers=1,
                    encoder_attention_heads=2,
                    decoder_attention_heads=2,
                    encoder_ffn_dim=64,
                    decoder_ffn_dim=64,
                    num_mel_bins=16,
                    max_source_positions=50,
                )
            ).encoder,
            (16, 100),
        ),
        "hf:encodec_encoder": lambda: (t.EncodecModel(t.EncodecConfig(num_filters=8, hidden_size=32)).encoder, SIGNAL),
        "hf:dac_encoder": lambda: (t.DacModel(t.DacConfig(encoder_hidden_size=8, hidden_size=32)).encoder, SIGNAL),
    }


def segmentation_models() -> dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]]:
    import segmentation_models_pytorch as smp

    catalogue = {}
    for name, kind in smp.MODEL_ARCHITECTURES_MAPPING.items():
        encoders = {"dpt": ["tu-vit_tiny_patch16_224"], "segformer": ["mit_b0", "resnet18"]}.get(
            name, ["resnet18", "mobilenet_v2"]
        )
        for encoder in encoders:
            options = {"dynamic_img_size": True} if encoder.startswith("tu-vit") else {}
            catalogue[f"smp:{name}/{encoder}"] = lambda kind=kind, encoder=encoder, options=options: (
                kind(encoder_name=encoder, encoder_weights=None, classes=3, **options),
                IMAGE,
            )
    return catalogue


def medical() -> dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]]:
    from monai.networks import nets

    def both(
        name: str, build: Callable[[int], nn.Module], only: tuple[int, ...] = (2, 3), side: int = 32
    ) -> dict[str, Any]:
        shapes = {2: (1, 2 * side, 2 * side), 3: (1, side, side, side)}
        return {f"monai:{name}-{d}d": (lambda d=d: (build(d), shapes[d])) for d in only}

    unet = {"in_channels": 1, "out_channels": 2}
    return {
        **both("unet", lambda d: nets.UNet(d, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, **unet)),
        **both("basic_unet", lambda d: nets.BasicUNet(d, features=(8, 8, 16, 32, 64, 8), **unet)),
        **both("basic_unet_plusplus", lambda d: nets.BasicUNetPlusPlus(d, features=(8, 8, 16, 32, 64, 8), **unet)),
        **both("attention_unet", lambda d: nets.AttentionUnet(d, channels=(8, 16, 32), strides=(2, 2), **unet)),
        **both("segresnet", lambda d: nets.SegResNet(d, init_filters=8, **unet)),
        **both("segresnet_ds", lambda d: nets.SegResNetDS(d, init_filters=8, **unet)),
        **both(
            "dynunet",
            lambda d: nets.DynUNet(
                d, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[8, 16, 32], **unet
            ),
        ),
        **both(
            "unetr",
            lambda d: nets.UNETR(
                img_size=(64, 64) if d == 2 else (32, 32, 32),
                feature_size=8,
                hidden_size=96,
                mlp_dim=192,
                num_heads=4,
                spatial_dims=d,
                **unet,
            ),
        ),
        # Five halvings down to a bottleneck normalised per instance: 64 voxels a side (32 leave one).
        **both(
            "swin_unetr",
            lambda d: nets.SwinUNETR(
                feature_size=12, spatial_dims=d, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), **unet
            ),
            side=64,
        ),
        **both("vnet", lambda d: nets.VNet(d, in_channels=1, out_channels=2), only=(3,)),
        **both("highresnet", lambda d: nets.HighResNet(d, in_channels=1, out_channels=2)),
        **both("densenet121", lambda d: nets.DenseNet121(d, in_channels=1, out_channels=2)),
        **both("resnet10", lambda d: nets.resnet10(spatial_dims=d, n_input_channels=1, num_classes=2)),
        **both(
            "efficientnet_b0",
            lambda d: nets.EfficientNetBN(
                "efficientnet-b0", spatial_dims=d, in_channels=1, num_classes=2, pretrained=False
            ),
        ),
        **both("flexible_unet", lambda d: nets.FlexibleUNet(1, 2, "efficientnet-b0", pretrained=False, spatial_dims=d)),
        **both(
            "ahnet", lambda d: nets.AHNet(spatial_dims=d, in_channels=1, out_channels=2, psp_block_num=2), only=(3,)
        ),
        **both(
            "mednext",
            lambda d: nets.MedNeXt(
                spatial_dims=d, init_filters=8, blocks_down=(1, 1, 1), blocks_bottleneck=1, blocks_up=(1, 1, 1), **unet
            ),
        ),
        **both("regunet", lambda d: nets.RegUNet(d, in_channels=1, num_channel_initial=8, depth=2, out_channels=2)),
        **both(
            "localnet",
            lambda d: nets.LocalNet(d, in_channels=1, num_channel_initial=8, extract_levels=(0, 1, 2), out_channels=2),
        ),
        **both("autoencoder", lambda d: nets.AutoEncoder(d, channels=(8, 16), strides=(2, 2), **unet)),
        **both(
            "classifier",
            lambda d: nets.Classifier((1, 64, 64) if d == 2 else VOLUME, classes=2, channels=(8, 16), strides=(2, 2)),
        ),
        **both(
            "vit",
            lambda d: nets.ViT(
                1,
                (64, 64) if d == 2 else (32, 32, 32),
                16,
                hidden_size=96,
                mlp_dim=192,
                num_heads=4,
                num_layers=2,
                spatial_dims=d,
            ),
        ),
        **both("quicknat", lambda d: nets.Quicknat(num_classes=2, num_channels=1, num_filters=8), only=(2,)),
    }


CATALOGUES = {"hf": hugging_face, "smp": segmentation_models, "monai": medical}


def catalogue(sources: list[str]) -> dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]]:
    """The builders of every installed source asked for."""
    found = {}
    for source in sources:
        if importlib.util.find_spec(SOURCES[source]) is None:
            print(f"{source}: {SOURCES[source]} is not installed, left out")
            continue
        found |= CATALOGUES[source]()
    return found


_LAST: dict[tuple[str, str], tuple[nn.Module, tuple[int, ...]]] = {}  # the model built last, per device


def build(name: str, size: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """``zoo_sweep``'s builder, ``(name, size) -> (model in eval mode, shape)``, over this catalogue (``size`` is
    each model's own). The model built last is kept: ``sweep_one`` builds it, then the maps need it again."""
    key = (name, str(torch.empty(0).device))  # zoo_sweep builds on the meta device first
    if key not in _LAST:
        torch.manual_seed(0)
        model, shape = CATALOGUES[name.partition(":")[0]]()[name]()
        _LAST.clear()
        _LAST[key] = model.eval(), shape
    return _LAST[key]


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------


def maps_check(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """The default layers' maps of two random probes: finite, boxes inside the input, fractions in [0, 1]."""
    table = receptive_fields(model, shape, strict=False)
    probes = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = receptive_maps(model, probes, table=table)
    record: dict[str, Any] = {"layers": len(maps.layers), "seconds": time.perf_counter() - start}
    dims = len(shape) - 1
    inside = (maps.boxes[..., :dims] >= 0).all() and (maps.boxes[..., dims:] <= torch.tensor(shape[1:])).all()
    problems = []
    if not torch.isfinite(maps.maps).all():
        problems.append("non-finite maps")
    if not inside:
        problems.append("boxes outside the input")
    for name in ("size_fraction", "mass_fraction"):
        values = getattr(maps.erf, name)
        if ((values < 0) | (values > 1 + 1e-6)).any():
            problems.append(f"{name} outside [0, 1]: {values.max().item():.3f}")
    noise = [str(w.message) for w in caught if "does not depend on the input" in str(w.message)]
    return record | {"dead": float(maps.erf.dead.float().mean()), "noise warnings": len(noise), "problems": problems}


def sweep(name: str, args: argparse.Namespace, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """``zoo_sweep``'s record of one model of this catalogue, with its maps (kept from ``previous`` with the rest of
    the record where the table has not changed)."""
    record = sweep_one(name, args, previous, build)
    if args.maps and record["status"] in ("ok", "refused") and "same table as" not in record:
        try:
            model, shape = build(name)
            record["maps"] = maps_check(model, shape)
        except Exception as error:  # noqa: BLE001  (a failure of ours: recorded, the sweep goes on)
            record["maps"] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return record


def describe(record: dict[str, Any]) -> str:
    """``zoo_sweep``'s line, with the number of layers mapped."""
    maps = record.get("maps")
    if not maps:
        return line(record)
    trouble = " PROBLEMS" if maps.get("problems") or "error" in maps else ""
    return f"{line(record)}  maps {maps.get('layers', '-')} layers{trouble}"


def summary(records: list[dict[str, Any]]) -> str:
    lines = [zoo_summary(records)]
    mapped = [r for r in records if "maps" in r]
    failed = [r for r in mapped if "error" in r["maps"] or r["maps"].get("problems")]
    layers = sum(r["maps"].get("layers", 0) for r in mapped)
    noise = [r["model"] for r in mapped if r["maps"].get("noise warnings")]
    lines.append(
        f"maps: {len(mapped) - len(failed)} of {len(mapped)} models fine ({layers} layers);"
        f" channel-sum warnings on {len(noise)}: {', '.join(noise) or '-'}"
    )
    for r in failed:
        lines.append(f"  MAPS {r['model']}: {r['maps'].get('error') or '; '.join(r['maps']['problems'])}")
    families = collections.Counter(r["model"].partition(":")[0] for r in records if r["status"] == "ok")
    lines.append("traced in strict mode, by family: " + ", ".join(f"{f} {n}" for f, n in sorted(families.items())))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="source:name (see --list)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--list", action="store_true", help="print the catalogue and stop")
    parser.add_argument("--no-maps", dest="maps", action="store_false", help="skip the maps")
    add_options(parser)
    parser.set_defaults(repeats=0, units=24, rows=6, max_pixels=64**3)  # 3-D: SwinUNETR's 64³ checked too
    args = parser.parse_args()
    args.size = None
    if args.summary:
        print(summary(list(_read(args.jsonl).values())))
        return
    models = catalogue(args.sources)
    if args.list:
        print("\n".join(models))
        return
    names = args.models or list(models)
    unknown = [name for name in names if name not in models]
    if unknown:
        parser.error(f"unknown models {unknown}; --list shows the catalogue")
    installed = {SOURCES[name.partition(":")[0]] for name in names}
    versions = "".join(f", {library} {importlib.metadata.version(library)}" for library in sorted(installed))
    print(summary(sweep_models(names, args, sweep, describe, versions)))


if __name__ == "__main__":
    main()
