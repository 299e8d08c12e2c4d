"""ActorQ: distributed reinforcement learning with quantized actors and a full-precision learner.

Lu et al., "QuaRL: Quantization for Fast and Environmentally Sustainable Reinforcement Learning"
(ActorQ; HAET workshop, ICLR 2021; reference code harvard-edge/QuaRL). Actors run int8 or fp16
copies of the policy (PyTorch dynamic quantization) to collect experience faster; one learner
trains in fp32 from a replay buffer and refreshes the actors' weights every K learner steps.

    from haet.rl import RLConfig, Until, train
    record = train(RLConfig(env="CartPole-v1", actors=2, actor_precision="int8", backend="local"),
                   until=Until(195.0), budget=Budget(time_s=120))

Needs the rl extra (ray, gymnasium): ``pip install 'haet[rl]'``.
"""

from .config import ENVS, PRECISIONS, RLConfig, Until
from .policy import encode_weights, load_weights, make_policy, payload_bytes, quantize_policy
from .system import ActorQ, train

__all__ = ["ActorQ", "ENVS", "PRECISIONS", "RLConfig", "Until", "encode_weights", "load_weights", "make_policy",
           "payload_bytes", "quantize_policy", "train"]
