"""Model-family adapters: the only place that knows HF attribute names.

Each family is one ``FamilyAdapter`` declaration (data, not code). Pipeline code
asks the adapter for "the MLP output projection of layer 3" and never spells
``down_proj`` itself. The adapter also owns the config rewrite after surgery.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from gprune.errors import ConfigError


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"            # dotted path from the CausalLM to the layer list
    mlp: str = "mlp"
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")   # rows = MLP channels
    mlp_out: str = "down_proj"                           # columns = MLP channels
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str = "num_key_value_heads"
    intermediate_attr: str = "intermediate_size"
    hf_class: str = "LlamaForCausalLM"      # transformers class the pruned checkpoint subclasses

    @property
    def gated(self) -> bool:
        return len(self.mlp_in) == 2

    # ---- structure -------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(_get(model, self.layers))

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.mlp)

    def attn_module(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.attn)

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        mlp = self.mlp_module(layer)
        return [getattr(mlp, n) for n in self.mlp_in]

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.mlp_module(layer), self.mlp_out)

    def attn_qkv(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attn = self.attn_module(layer)
        return getattr(attn, self.q), getattr(attn, self.k), getattr(attn, self.v)

    def attn_output(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.attn_module(layer), self.o)

    # ---- sizes -----------------------------------------------------------
    def num_heads(self, config: Any) -> int:
        return int(getattr(config, self.heads_attr))

    def num_kv_heads(self, config: Any) -> int:
        return int(getattr(config, self.kv_heads_attr, None) or self.num_heads(config))

    def head_dim(self, config: Any) -> int:
        explicit = getattr(config, "head_dim", None)
        return int(explicit) if explicit else config.hidden_size // self.num_heads(config)

    def intermediate_size(self, config: Any) -> int:
        return int(getattr(config, self.intermediate_attr))

    def num_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def shape(self, config: Any) -> "ModelShape":
        return ModelShape(
            num_layers=self.num_layers(config), hidden=int(config.hidden_size),
            intermediate=self.intermediate_size(config), heads=self.num_heads(config),
            kv_heads=self.num_kv_heads(config), head_dim=self.head_dim(config),
            gated=self.gated)

    # ---- names for the shipped modeling code -----------------------------
    def names(self) -> dict[str, Any]:
        """Attribute names the self-contained pruned-checkpoint code needs."""
        return {"layers": self.layers, "mlp": self.mlp, "mlp_in": list(self.mlp_in),
                "mlp_out": self.mlp_out, "attn": self.attn,
                "q": self.q, "k": self.k, "v": self.v, "o": self.o}


@dataclass(frozen=True)
class ModelShape:
    """Dense sizes of a model, enough to count prunable parameters."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool

    @property
    def params_per_channel(self) -> int:
        return (3 if self.gated else 2) * self.hidden

    @property
    def q_params_per_head(self) -> int:       # q rows + o columns of one query head
        return 2 * self.hidden * self.head_dim

    @property
    def kv_params_per_group(self) -> int:     # k rows + v rows of one KV group
        return 2 * self.hidden * self.head_dim

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def head_params_amortized(self) -> float:
        """A query head's q/o parameters plus its share of its KV group's k/v."""
        return self.q_params_per_head + self.kv_params_per_group / self.group_size

    def layer_params(self, channels: int, heads: int, groups: int) -> int:
        """Prunable parameters of a layer keeping these MLP channels, query heads, KV groups."""
        return (channels * self.params_per_channel + heads * self.q_params_per_head
                + groups * self.kv_params_per_group)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


ADAPTERS: dict[str, FamilyAdapter] = {
    a.name: a for a in (
        FamilyAdapter("llama", ("llama",), hf_class="LlamaForCausalLM"),
        FamilyAdapter("mistral", ("mistral",), hf_class="MistralForCausalLM"),
        FamilyAdapter("qwen2", ("qwen2",), hf_class="Qwen2ForCausalLM"),
        FamilyAdapter("qwen3", ("qwen3",), hf_class="Qwen3ForCausalLM"),
        FamilyAdapter("gemma3", ("gemma3_text",), hf_class="Gemma3ForCausalLM"),
        FamilyAdapter("starcoder2", ("starcoder2",), mlp_in=("c_fc",), mlp_out="c_proj",
                      hf_class="Starcoder2ForCausalLM"),
    )
}
_BY_MODEL_TYPE = {mt: a for a in ADAPTERS.values() for mt in a.model_types}


def adapter_for(config: Any) -> FamilyAdapter:
    """The adapter of a transformers config; a clear error for unknown families."""
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ConfigError(f"unsupported model family {model_type!r}; supported model types: "
                      f"{', '.join(sorted(_BY_MODEL_TYPE))}")
