"""Llama 3 / 3.1 (and 3.2-shaped 1B/3B) model family."""

from torchtitan.models.llama3.args import RoPEScalingArgs, TransformerModelArgs, llama3_configs
from torchtitan.models.llama3.model import Transformer
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.models.model_spec import ModelSpec, lazy_function

__all__ = [
    "RoPEScalingArgs",
    "Transformer",
    "TransformerModelArgs",
    "llama3_configs",
    "llama3_spec",
]

# parallelize.py and pipeline.py import torch.distributed machinery; they are loaded when
# first used, so building or inspecting the model does not need them.
llama3_spec = ModelSpec(
    name="llama3",
    model_cls=Transformer,
    flavors=llama3_configs,
    parallelize_fn=lazy_function("torchtitan.models.llama3.parallelize:parallelize_llama"),
    pipelining_fn=lazy_function("torchtitan.models.llama3.pipeline:pipeline_llama"),
    build_loss_fn=lazy_function("torchtitan.components.loss:build_loss_fn"),
    state_dict_adapter=Llama3StateDictAdapter,
    # Dense: refuses parallelism.expert_parallel_degree > 1 before anything is built.
    validate_fn=lazy_function("torchtitan.models.common.moe_balance:validate_moe_config"),
)
