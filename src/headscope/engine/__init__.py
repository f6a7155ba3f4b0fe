"""Head addressing, token batches and batched runs: the layer every detector stands on."""

from headscope.engine.heads import (
    Head,
    HeadScore,
    ModelShape,
    all_heads,
    check_head,
    check_head_hooks,
    check_heads,
    heads_by_layer,
    hook_name,
    kv_group,
    kv_head,
    model_shape,
)
from headscope.engine.metrics import masked_mean, next_token_losses
from headscope.engine.runner import (
    auto_batch_size,
    forward,
    forward_with_cache,
    model_device,
    model_dtype,
    run_batched,
)
from headscope.engine.tokens import TokenBatch, as_token_batch, bos_token_id, iter_batches, tokenize

__all__ = [
    "Head",
    "HeadScore",
    "ModelShape",
    "TokenBatch",
    "all_heads",
    "as_token_batch",
    "auto_batch_size",
    "bos_token_id",
    "check_head",
    "check_head_hooks",
    "check_heads",
    "forward",
    "forward_with_cache",
    "heads_by_layer",
    "hook_name",
    "iter_batches",
    "kv_group",
    "kv_head",
    "masked_mean",
    "model_device",
    "model_dtype",
    "model_shape",
    "next_token_losses",
    "run_batched",
    "tokenize",
]
