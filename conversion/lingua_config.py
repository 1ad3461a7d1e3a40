"""The model arguments of the official MTA code (lingua's params.json) as an MTAConfig.

The fields and their meaning are those of facebookresearch/RAM projects/mta (MTATransformerArgs,
LMTransformerArgs) and of lingua's FeedForward (its hidden-size rule). Every field is either
mapped, known not to affect a trained model, or refused when it is switched on: nothing is
silently dropped.
"""

from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

from modeling_mta import MTAConfig

from .errors import ConversionError
from .json_files import read_json_object

MAPPED = {"dim", "n_layers", "head_dim", "n_heads", "n_kv_heads", "ffn_dim_multiplier", "multiple_of", "norm_eps",
          "rope_theta", "max_seqlen", "vocab_size", "weight_tying", "dropout", "mta"}  # fmt: skip
MTA_MAPPED = {"use_mta", "query_kernel_size", "key_kernel_size", "pad_key", "mta_layers", "after_sm_query_kernel_size",
              "after_sm_key_kernel_size", "head_kernel_size", "group_norm", "layer_norm_rescale", "pre_sm_linear_head",
              "post_sm_linear_head", "add_gating", "gate_1d"}  # fmt: skip
# Initialisation and bookkeeping: no effect on what a trained checkpoint computes.
IGNORED = {"init_base_std", "init_std_factor", "seed", "cache_attention_maps"}
MTA_IGNORED = {"init_method"}
# Switched on, these change the computation in ways this model does not implement.
REFUSED = {
    "sliding_window": "sliding-window attention",
    "triton": "the Triton MTA implementation, whose checkpoints name their MTA parameters differently",
}
MTA_REFUSED = {"curse_norm": "curse_norm (depth rescaling of the blocks' RMSNorms)"}


def read_lingua_params(folder: Path) -> dict:
    """The model arguments in `folder`/params.json: its "model" entry, or the whole file if it holds them directly."""
    path = folder / "params.json"
    params = read_json_object(path, "is it a consolidated lingua checkpoint folder?")
    model = params.get("model", params)
    if not isinstance(model, dict) or "dim" not in model:
        raise ConversionError(f"{path} holds no model arguments (expected a \"model\" entry with \"dim\", ...)")
    return model


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """lingua's FeedForward width: 2/3 of 4 * dim, times the multiplier, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


def mta_config_from_lingua(args: dict) -> MTAConfig:
    """The MTAConfig that computes what the official code computes with model arguments `args`."""
    mta = args.get("mta") or {}
    _check_fields(args, MAPPED, IGNORED, REFUSED, "")
    _check_fields(mta, MTA_MAPPED, MTA_IGNORED, MTA_REFUSED, "mta.")
    n_layers, dim = args["n_layers"], args["dim"]
    head_dim = args.get("head_dim") or dim // args["n_heads"]
    n_heads = args.get("n_heads") or dim // head_dim
    use_mta = bool(mta.get("use_mta"))
    mta_layers = _mta_layers(mta, n_layers) if use_mta else []
    pre_kernel = _kernel(mta.get("query_kernel_size", 1), mta.get("key_kernel_size", 1)) if use_mta else None
    post_kernel = _kernel(mta.get("after_sm_query_kernel_size"), mta.get("after_sm_key_kernel_size")) if use_mta else None
    head_kernel_size = mta.get("head_kernel_size") if use_mta else None
    pre_linear_head = use_mta and bool(mta.get("pre_sm_linear_head"))
    post_linear_head = use_mta and bool(mta.get("post_sm_linear_head"))
    if head_kernel_size is not None and post_linear_head:
        raise ConversionError("params.json sets both mta.head_kernel_size and mta.post_sm_linear_head (the official code refuses it)")
    twice = _layers_with_double_softmax(n_layers, mta_layers, post_kernel is not None,
                                        head_kernel_size is not None or post_linear_head, pre_linear_head)  # fmt: skip
    if twice:
        raise ConversionError(
            f"in layers {twice} the official code applies the softmax twice (its MTA attention path repeats "
            "softmax(scores + mask) when a layer has no post-softmax operation: no after-softmax kernel, "
            "head_kernel_size or post_sm_linear_head); this model applies it once, so it would not compute "
            "what the checkpoint was trained to compute"
        )
    gate = ("scalar" if mta.get("gate_1d", True) else "vector") if mta.get("add_gating") else None
    fields = dict(
        vocab_size=args["vocab_size"], hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=args.get("n_kv_heads") or n_heads, head_dim=head_dim,
        intermediate_size=ffn_hidden_dim(dim, args.get("multiple_of", 256), args.get("ffn_dim_multiplier")),
        rms_norm_eps=args.get("norm_eps", 1e-5), max_position_embeddings=args.get("max_seqlen", 1024),
        rope_parameters={"rope_type": "default", "rope_theta": float(args.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(args.get("weight_tying")), attention_dropout=float(args.get("dropout", 0.0)),
        bos_token_id=None, eos_token_id=None,  # lingua's tokenizer lives outside the checkpoint
        mta_layers=mta_layers, kq_conv_size=pre_kernel, kq_conv_post_size=post_kernel,
        key_padding=mta.get("pad_key", "both"),
        head_mix_size=n_heads if pre_linear_head else None,
        head_mix_post_size=n_heads if post_linear_head else head_kernel_size,
        group_norm=bool(mta.get("group_norm")), group_norm_depth_scaling=bool(mta.get("layer_norm_rescale")),
        attn_gate=gate, mta_init="identity",
    )  # fmt: skip
    try:
        return MTAConfig(**fields)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"params.json describes a model this MTAConfig cannot hold: {error}") from error


def _check_fields(args: dict, mapped: set, ignored: set, refused: dict, prefix: str) -> None:
    unknown = sorted(set(args) - mapped - ignored - set(refused))
    if unknown:
        raise ConversionError(f"params.json has model arguments this converter does not know: {[prefix + k for k in unknown]}")
    for name, what in refused.items():
        if args.get(name):
            raise ConversionError(f"params.json switches on {prefix}{name}={args[name]!r}: {what} has no counterpart here")


def _mta_layers(mta: dict, n_layers: int) -> list[int]:
    """mta_layers is a comma-separated string; absent, every layer gets the kernels."""
    layers = mta.get("mta_layers")
    if layers is None:
        return list(range(n_layers))
    try:
        return [int(part) for part in str(layers).split(",")]
    except ValueError as error:
        raise ConversionError(f"params.json: mta.mta_layers must be comma-separated layer indices, got {layers!r}") from error


def _kernel(query_size: int | None, key_size: int | None) -> list[int] | None:
    return None if query_size is None or key_size is None else [query_size, key_size]


def _layers_with_double_softmax(n_layers, mta_layers, post_kernel: bool, post_head_mix: bool, pre_head_mix: bool):
    # The official code runs a layer through its MTA path if it has kernels (it is in mta_layers) or any
    # head mixing; that path softmaxes again at the end unless a post-softmax operation ran.
    return [layer for layer in range(n_layers)
            if (layer in mta_layers or pre_head_mix or post_head_mix)
            and not (post_head_mix or (layer in mta_layers and post_kernel))]  # fmt: skip
