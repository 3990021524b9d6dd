"""Qwen3 model family: dense (0.6B ... 32B) and Mixture-of-Experts (30B-A3B, 235B-A22B)."""

from torchtitan.models.model_spec import ModelSpec, lazy_function
from torchtitan.models.qwen3.args import Qwen3ModelArgs, qwen3_configs
from torchtitan.models.qwen3.model import Qwen3Transformer
from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

__all__ = ["Qwen3ModelArgs", "Qwen3StateDictAdapter", "Qwen3Transformer", "qwen3_configs", "qwen3_spec"]

# parallelize.py and the pipeline split import torch.distributed machinery; they are loaded
# when first used. The pipeline split is Llama 3's: it only needs the shared module names
# (tok_embeddings, layers.N, norm, output), which this model keeps.
qwen3_spec = ModelSpec(
    name="qwen3",
    model_cls=Qwen3Transformer,
    flavors=qwen3_configs,
    parallelize_fn=lazy_function("torchtitan.models.qwen3.parallelize:parallelize_qwen3"),
    pipelining_fn=lazy_function("torchtitan.models.llama3.pipeline:pipeline_llama"),
    build_loss_fn=lazy_function("torchtitan.components.loss:build_loss_fn"),
    state_dict_adapter=Qwen3StateDictAdapter,
    validate_fn=lazy_function("torchtitan.models.qwen3.args:validate_qwen3"),
    build_step_hooks_fn=lazy_function("torchtitan.models.common.moe_balance:build_moe_step_hooks"),
    metrics_fn=lazy_function("torchtitan.models.common.moe_balance:moe_metrics"),
)
