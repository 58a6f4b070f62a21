"""Which modules of a checkpoint are quantized, read from ``config.json`` as mlx-lm writes it.

mlx-lm writes ``"quantization": {"group_size": 64, "bits": 4, "mode": "affine"}``
(duplicated as ``"quantization_config"``); mixed-precision recipes add one
entry per module path, ``"model.layers.0.mlp.down_proj": {"group_size": 64,
"bits": 6}``, or ``false`` for a module left in float. MLX's float modes
(``"mode": "mxfp4"``, ``"nvfp4"``, ``"mxfp8"``) are read into the forms every
backend runs (:mod:`ferrum.quant.float_modes`), and so are Hugging Face's
``quant_method`` "awq" and "gptq" sections (:mod:`ferrum.quant.awq_gptq`) and gpt-oss's "mxfp4". FP8
checkpoints (``quant_method`` "fp8": Qwen3-*-FP8, DeepSeek's and Mistral's FP8 releases; compressed-tensors'
"float-quantized": RedHatAI's ``*-FP8-dynamic``) are decoded to float at load (:mod:`ferrum.quant.fp8`;
mode "fp8", :attr:`QuantConfig.fp8` saying how their scales are laid out), and so are BitNet's ternary ones
(``quant_method`` "bitnet", :mod:`ferrum.quant.bitnet`, whose layers also quantize their inputs). Other schemes
(bitsandbytes, compressed-tensors' integer formats, ModelOpt...) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ferrum.errors import CheckpointError, ConfigError, InvalidRequestError, UnsupportedFeatureError
from ferrum.quant.bitnet import BITNET, BitnetScheme, parse as parse_bitnet
from ferrum.quant.fp8 import FP8, Fp8Scheme, is_fp8_section, parse as parse_fp8
from ferrum.quant.affine import SUPPORTED_GROUP_SIZES, check_format

Format = tuple[int, int]  # (bits, group_size)
AFFINE = "affine"
#: MLX's float quantization modes: their (bits, group size), fixed by the mode.
FLOAT_MODES: dict[str, Format] = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
#: What MLX's quantized layers take where a module's own entry leaves bits or group_size out (mlx-lm hands the
#: entry to ``to_quantized`` as it is: a quant_predicate's ``{"bits": 8}``).
AFFINE_DEFAULTS: Format = (4, 64)


@dataclass(frozen=True)
class QuantConfig:
    """The default ``(bits, group_size)`` and mode, and per-module overrides (``None``: kept in float) with
    the modes of those that have their own."""

    bits: int
    group_size: int
    overrides: Mapping[str, Format | None] = field(default_factory=dict)
    mode: str = AFFINE
    modes: Mapping[str, str] = field(default_factory=dict)
    fp8: Fp8Scheme | None = None  # an FP8 checkpoint's scale layout (mode "fp8")
    bitnet: BitnetScheme | None = None  # a BitNet checkpoint's weights and unconverted modules (mode "bitnet")

    @property
    def runs_as_float(self) -> bool:
        """Whether the quantized weights are decoded to float ones at load (FP8, BitNet), so the model picks its
        backend and dtype and runs as a float checkpoint does."""
        return self.mode in (FP8, BITNET)

    def declares(self, module: str) -> bool:
        """Whether config.json gives ``module`` an entry of its own. mlx-lm reads the format of a packed module
        it does not name from the module's tensors (:func:`stored_mode`), the top level being only a default
        ("the top-level default can be wrong": a mixed conversion whose entries were dropped), and so does
        Ferrum, where the top level is MLX's."""
        return module in self.overrides

    @property
    def infers_formats(self) -> bool:
        """Whether modules config.json does not name take the format their tensors say (MLX's sections), not
        the top level's (AWQ, GPTQ, FP8: one format throughout)."""
        return self.mode == AFFINE or self.mode in FLOAT_MODES

    def for_module(self, module: str) -> Format | None:
        """The format config.json gives ``module`` (a path like ``model.layers.0.mlp.down_proj``)."""
        if module in self.overrides:
            return self.overrides[module]
        return self.bits, self.group_size

    def mode_for(self, module: str) -> str:
        """``module``'s quantization mode: "affine", one of :data:`FLOAT_MODES`, "awq" / "gptq" /
        "gptq_v2" for a checkpoint in those layouts, or "fp8"."""
        return self.modes.get(module, self.mode)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
        for module, fmt in self.overrides.items():
            out[module] = False if fmt is None else {"group_size": fmt[1], "bits": fmt[0],
                                                     "mode": self.mode_for(module)}
        return out

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str = "config") -> "QuantConfig | None":
        """Parse ``raw`` (a config.json dict); ``None`` for a float checkpoint."""
        section = raw.get("quantization")
        if section is None:
            section = raw.get("quantization_config")
        if section is None:
            return None
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: 'quantization' must be an object, got {section!r}")
        method = section.get("quant_method")
        if method is None and any(str(key).startswith(("load_in_", "bnb_")) for key in section):
            method = "bitsandbytes"  # transformers' older spelling: load_in_4bit and bnb_* keys alone
        if method is not None:
            return cls._foreign(section, method, where)
        bits, group_size, mode = _format(section, where, "quantization")
        overrides: dict[str, Format | None] = {}
        modes: dict[str, str] = {}
        for key, value in section.items():
            if key in ("bits", "group_size", "mode"):
                continue
            if value is False:
                overrides[key] = None
            elif isinstance(value, Mapping):
                module_bits, module_group, module_mode = _format(value, where, f"quantization[{key!r}]",
                                                                 AFFINE_DEFAULTS)
                overrides[key] = (module_bits, module_group)
                if module_mode != mode:
                    modes[key] = module_mode
            else:
                raise ConfigError(
                    f"{where}: quantization entry {key!r} must be false or an object with bits and group_size, "
                    f"got {value!r}"
                )
        return cls(bits, group_size, overrides, mode, modes)

    @classmethod
    def _foreign(cls, section: Mapping[str, Any], method: Any, where: str) -> "QuantConfig":
        """An AutoAWQ (GEMM) or GPTQ section (:mod:`ferrum.quant.awq_gptq`), an FP8 one (:mod:`ferrum.quant.fp8`),
        a BitNet one (:mod:`ferrum.quant.bitnet`),
        or gpt-oss's MXFP4 one (its experts in ``*_blocks`` / ``*_scales``, MLX's mxfp4 codes:
        :mod:`ferrum.moe.gpt_oss`); other methods refused by name."""
        if method == "mxfp4":
            return cls(*FLOAT_MODES["mxfp4"], {}, "mxfp4")
        if is_fp8_section(section):
            return cls(8, 0, {}, FP8, fp8=parse_fp8(section, where))
        if method == BITNET:
            return cls(2, 0, {}, BITNET, bitnet=parse_bitnet(section, where))
        if method not in ("awq", "gptq"):
            raise UnsupportedFeatureError(
                f"{where}: quant_method {method!r} checkpoints are not supported; Ferrum runs MLX's quantization "
                "(mlx-community checkpoints, `ferrum quantize`), GGUF files, AWQ, GPTQ, FP8 and BitNet: convert the "
                "float model with `ferrum quantize SRC DST --bits 4`"
            )
        bits, group_size = _bits_and_group(section, where, "quantization_config", default=(4, 128))
        if method == "awq":
            version = str(section.get("version", "gemm")).lower()
            if version != "gemm" or bits != 4 or section.get("zero_point", True) is not True:
                raise UnsupportedFeatureError(
                    f"{where}: AWQ version {version!r} at {bits} bits, zero_point {section.get('zero_point', True)}: "
                    "Ferrum reads AutoAWQ's GEMM layout at 4 bits with zero points"
                )
            mode = "awq"
        else:
            mode = section.get("checkpoint_format", section.get("format", "gptq"))
            if mode not in ("gptq", "gptq_v2") or bits not in (2, 4, 8):
                raise UnsupportedFeatureError(
                    f"{where}: GPTQ format {mode!r} at {bits} bits: Ferrum reads formats gptq and gptq_v2 at 2, 4 "
                    "or 8 bits"
                )
            dynamic = section.get("dynamic") or {}
            changed = [pattern for pattern, settings in dynamic.items() if not str(pattern).startswith("-:")
                       and settings] if isinstance(dynamic, Mapping) else [dynamic]
            if changed:  # "-:pattern" only leaves modules float, which their float tensors say anyway
                raise UnsupportedFeatureError(
                    f"{where}: GPTQModel's dynamic per-module settings ({changed[0]!r}) are not supported: Ferrum "
                    f"reads one bits and group_size for every packed layer; requantize without them"
                )
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise UnsupportedFeatureError(
                f"{where}: {method} group_size {group_size}: Ferrum runs groups of {SUPPORTED_GROUP_SIZES} inputs "
                "(not -1, one group per row)"
            )
        return cls(bits, group_size, {}, mode)


#: Files older AWQ and GPTQ releases describe their quantization in instead of config.json, with the
#: method each implies and its keys' spellings in Hugging Face's quantization_config.
SIDECARS = {"quantize_config.json": ("gptq", {}),  # AutoGPTQ
            "quant_config.json": ("awq", {"w_bit": "bits", "q_group_size": "group_size"}),  # AutoAWQ
            "hf_quant_config.json": ("modelopt", {})}  # NVIDIA ModelOpt exports: refused by name


def sidecar_section(files: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """A ``quantization_config`` section from a sidecar file's contents (file name -> its JSON), or None."""
    for name, (method, renamed) in SIDECARS.items():
        found = files.get(name)
        if isinstance(found, Mapping):
            return {"quant_method": method, **{renamed.get(key, key): value for key, value in found.items()}}
    return None


def stored_mode(module: str, codes: Any, scales: Any, k: int, biased: bool, where: str) -> str:
    """The mode of a packed module config.json does not name, from its tensors as mlx-lm reads them: affine has
    biases beside its codes and float scales; each float mode has uint8 scales, no biases, and its own (bits,
    group size) (``codes`` ``[..., K * bits / 32]`` and ``scales`` ``[..., K / group_size]`` of a ``K``-wide
    matrix)."""
    if biased:
        return AFFINE
    groups = scales.shape[-1] if scales.ndim else 0
    fmt = (codes.shape[-1] * 32 // k, k // groups) if groups and k % groups == 0 else None
    mode = next((name for name, pair in FLOAT_MODES.items() if pair == fmt), None)
    if scales.dtype.name != "uint8" or mode is None:
        modes = ", ".join(f"{m} {b}-bit in groups of {g}" for m, (b, g) in FLOAT_MODES.items())
        raise CheckpointError(
            f"{where}: {module} is packed without {module}.biases, its scales {scales.dtype} {list(scales.shape)} "
            f"for codes {list(codes.shape)}: neither affine (float scales and biases: is {module}.biases missing?) "
            f"nor one of MLX's float modes (uint8 scales; {modes}), and config.json names no format for it")
    return mode


def _bits_and_group(section: Mapping[str, Any], where: str, what: str,
                    default: tuple[int | None, int | None] = (None, None)) -> Format:
    """A section's integer ``bits`` and ``group_size`` (``default`` where absent)."""
    values = section.get("bits", default[0]), section.get("group_size", default[1])
    for key, value in zip(("bits", "group_size"), values):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: {what} needs an integer {key!r}, got {value!r}")
    return values


def _format(section: Mapping[str, Any], where: str, what: str,
            default: tuple[int | None, int | None] = (None, None)) -> tuple[int, int, str]:
    """``(bits, group_size, mode)`` of one section, checked (affine's ``default`` where it leaves them out)."""
    mode = section.get("mode", AFFINE)
    if not isinstance(mode, str):
        raise ConfigError(f"{where}: {what}'s mode must be a name such as 'affine' or 'mxfp4', got {mode!r}")
    if mode != AFFINE and mode not in FLOAT_MODES:
        raise UnsupportedFeatureError(
            f"{where}: {what} uses mode {mode!r}; Ferrum runs MLX's 'affine' quantization and its float modes "
            f"{', '.join(FLOAT_MODES)}"
        )
    if mode in FLOAT_MODES:
        fixed = FLOAT_MODES[mode]
        got = (section.get("bits", fixed[0]), section.get("group_size", fixed[1]))
        if got != fixed:
            raise ConfigError(f"{where}: {what}: mode {mode!r} is {fixed[0]} bits in groups of {fixed[1]}, "
                              f"not {got[0]} bits in groups of {got[1]}")
        return (*fixed, mode)
    bits, group_size = _bits_and_group(section, where, what, default)
    try:
        check_format(bits, group_size, f"{where}: {what}")
    except InvalidRequestError as exc:
        raise UnsupportedFeatureError(str(exc)) from None
    return bits, group_size, mode
