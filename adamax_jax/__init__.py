"""AdaMax for JAX, as optax gradient transformations over pytrees."""

from adamax_jax._checkpoint import abstract_state as abstract_state
from adamax_jax._checkpoint import check_state as check_state
from adamax_jax._porting import assign_to_keras as assign_to_keras
from adamax_jax._porting import to_torch_state_dict as to_torch_state_dict
from adamax_jax._precision import CompensateRoundingState as CompensateRoundingState
from adamax_jax._precision import compensate_rounding as compensate_rounding
from adamax_jax._sharding import zero1_state_shardings as zero1_state_shardings
from adamax_jax._transform import ScaleByAdamaxState as ScaleByAdamaxState
from adamax_jax._transform import adamax as adamax
from adamax_jax._transform import adamax_state as adamax_state
from adamax_jax._transform import adamax_step as adamax_step
from adamax_jax._transform import adamaxw as adamaxw
from adamax_jax._transform import convert_state as convert_state
from adamax_jax._transform import first_moment as first_moment
from adamax_jax._transform import infinity_norm as infinity_norm
from adamax_jax._transform import nadamax as nadamax
from adamax_jax._transform import scale_by_adamax as scale_by_adamax

__version__ = "0.1.0"

__all__ = [
    "CompensateRoundingState",
    "ScaleByAdamaxState",
    "abstract_state",
    "adamax",
    "adamax_state",
    "adamax_step",
    "adamaxw",
    "assign_to_keras",
    "check_state",
    "compensate_rounding",
    "convert_state",
    "first_moment",
    "infinity_norm",
    "nadamax",
    "scale_by_adamax",
    "to_torch_state_dict",
    "zero1_state_shardings",
]
