"""DeepSeek-V3 model family: multi-head latent attention and DeepSeekMoE (V2-Lite 16B, V3 671B)."""

from torchtitan.models.deepseek_v3.args import DeepSeekV3ModelArgs, deepseek_v3_configs
from torchtitan.models.deepseek_v3.model import DeepSeekV3Transformer
from torchtitan.models.deepseek_v3.state_dict_adapter import DeepSeekV3StateDictAdapter
from torchtitan.models.model_spec import ModelSpec, lazy_function

__all__ = [
    "DeepSeekV3ModelArgs",
    "DeepSeekV3StateDictAdapter",
    "DeepSeekV3Transformer",
    "deepseek_v3_configs",
    "deepseek_v3_spec",
]

# parallelize.py and the pipeline split import torch.distributed machinery; they are loaded
# when first used. The pipeline split is Llama 3's: it only needs the shared module names
# (tok_embeddings, layers.N, norm, output), which this model keeps.
deepseek_v3_spec = ModelSpec(
    name="deepseek_v3",
    model_cls=DeepSeekV3Transformer,
    flavors=deepseek_v3_configs,
    parallelize_fn=lazy_function("torchtitan.models.deepseek_v3.parallelize:parallelize_deepseek_v3"),
    pipelining_fn=lazy_function("torchtitan.models.llama3.pipeline:pipeline_llama"),
    build_loss_fn=lazy_function("torchtitan.components.loss:build_loss_fn"),
    state_dict_adapter=DeepSeekV3StateDictAdapter,
    validate_fn=lazy_function("torchtitan.models.deepseek_v3.args:validate_deepseek_v3"),
    build_step_hooks_fn=lazy_function("torchtitan.models.common.moe_balance:build_moe_step_hooks"),
    metrics_fn=lazy_function("torchtitan.models.common.moe_balance:moe_metrics"),
)
