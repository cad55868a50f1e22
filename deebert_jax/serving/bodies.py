"""The request bodies beside `/predict`'s, as pydantic models: what each field may hold (the models
validate it, their JSON schema is the OpenAPI document's), and the inputs of each shape -> examples.

- `HFBody`: `POST /` of the default API, the Hugging Face Inference API's text-classification
  request: `{"inputs": "text" | ["t1", ...] | {"text", "text_pair"} | [{...}, ...],
  "parameters": {"top_k": k, "function_to_apply": "softmax" | "sigmoid" | "none"}}`.
- `TEIBody`: `--api tei`'s `/predict`, `/` and `/invocations`, Text Embeddings Inference's
  `PredictRequest` (its router's `http/types.rs`): "inputs" a text, a pair `[a, b]` or a batch
  `[[a], [a, b], ...]`; `truncate`, `truncation_direction`, `raw_scores`; and `parameters` as
  `HFBody`'s, which TEI's own parser drops and we honour (huggingface_hub's InferenceClient sends it).

Every model forbids other fields: a field we do not know is a 400 (422 in the TEI API) naming
it, never silently dropped. The texts themselves are checked by `requests` (empty, not a
string, lone surrogates), which names the index at fault.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, StrictBool

from deebert_jax.data.text_inputs import Example
from deebert_jax.serving.requests import RequestError, _item, _text, count_inputs

FUNCTIONS = ("softmax", "sigmoid", "none")
STRICT = ConfigDict(extra="forbid", strict=True)

TEXT = {"type": "string", "minLength": 1}
TEI_INPUTS_SCHEMA = {   # TEI's PredictInput, as its router's utoipa schema writes it
    "description": "A text, a pair of texts [text, pair], or a batch of [text] and [text, pair] lists",
    "oneOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 2},
              {"type": "array", "minItems": 1,
               "items": {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 2}}],
    "example": "What is Deep Learning?"}
PAIR_SCHEMA = {"type": "object", "required": ["text"], "additionalProperties": False,
               "properties": {"text": TEXT, "text_pair": TEXT}}
HF_INPUTS_SCHEMA = {
    "description": "A text, a {text, text_pair} object, or a list of texts and such objects",
    "oneOf": [TEXT, PAIR_SCHEMA, {"type": "array", "minItems": 1, "items": {"oneOf": [TEXT, PAIR_SCHEMA]}}],
    "example": "a gripping, beautifully acted film"}


class Parameters(BaseModel):
    """The Hugging Face Inference API's text-classification parameters."""
    model_config = STRICT
    top_k: PositiveInt | None = Field(None, description="the k most probable labels; default all")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="scores from the logits: softmax (default; sigmoid for a one-label model) or none (raw)")


class HFBody(BaseModel):
    model_config = STRICT
    inputs: Any = Field(json_schema_extra=HF_INPUTS_SCHEMA)
    parameters: Parameters | None = None


class TEIBody(BaseModel):
    model_config = STRICT
    inputs: Any = Field(json_schema_extra=TEI_INPUTS_SCHEMA)
    truncate: StrictBool | None = Field(None, description="cut inputs longer than the maximum input length "
                                                          "(default true, TEI's --auto-truncate); false: 422")
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    raw_scores: StrictBool = Field(False, description="the logits of the exit ramp, not their softmax")
    parameters: Parameters | None = None


class PredictBody(BaseModel):
    """`POST /predict` of the default API (parsed by `requests.parse_body`; here for its schema)."""
    model_config = STRICT
    inputs: Any = Field(json_schema_extra={
        "description": "A text, a list of texts, or a list of [text] / [text, pair] lists",
        "oneOf": [TEXT, {"type": "array", "minItems": 1,
                         "items": {"oneOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 2}]}}]})


def validate(model: type[BaseModel], data: dict) -> BaseModel:
    """`model.model_validate(data)`, or a 400 `RequestError` naming the first field at fault."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        error = e.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            allowed = model.model_fields if len(error["loc"]) == 1 else Parameters.model_fields
            raise RequestError(400, f'unknown field "{field}": expected only '
                                    + ", ".join(f'"{a}"' for a in allowed)) from None
        raise RequestError(400, f'"{field}": {error["msg"]}') from None


def scoring(body: BaseModel, num_labels: int) -> tuple[str, int | None]:
    """-> (the function turning logits into scores: "softmax", "sigmoid" or "none"; top_k or None)."""
    params = body.parameters or Parameters()
    function = params.function_to_apply
    if getattr(body, "raw_scores", False):
        if function not in (None, "none"):
            raise RequestError(400, f'"raw_scores" is true but "parameters.function_to_apply" is "{function}"')
        function = "none"
    return function or ("sigmoid" if num_labels == 1 else "softmax"), params.top_k


def hf_examples(inputs, max_inputs: int) -> list[Example]:
    """`HFBody.inputs` -> examples: a text, a {text, text_pair} object, or a list of those."""
    def one(value, field):
        if isinstance(value, dict):
            unknown = [k for k in value if k not in ("text", "text_pair")]
            if unknown:
                raise RequestError(400, f'unknown field "{field}.{unknown[0]}": expected "text", "text_pair"')
            if "text" not in value:
                raise RequestError(400, f'"{field}" has no "text"')
            pair = value.get("text_pair")
            return (_text(value["text"], f"{field}.text"),
                    None if pair is None else _text(pair, f"{field}.text_pair"))
        return _text(value, field), None
    if isinstance(inputs, list):
        if not inputs:
            raise RequestError(400, '"inputs" is an empty list')
        count_inputs(len(inputs), max_inputs)
        return [one(v, f"inputs[{i}]") for i, v in enumerate(inputs)]
    if isinstance(inputs, (str, dict)) or inputs is None:
        return [one(inputs, "inputs")]
    raise RequestError(400, f'"inputs" must be a string, an object or a list, got {type(inputs).__name__}')


def tei_examples(inputs, max_inputs: int) -> tuple[list[Example], bool]:
    """`TEIBody.inputs` -> (examples, batched), as TEI's `PredictInput` reads it: a string is one
    text; a list whose first item is a string is one text or pair ([a] or [a, b]); a list whose
    first item is a list is a batch of [a] / [a, b] lists, answered as a list of lists."""
    if isinstance(inputs, str) or inputs is None:
        return [(_text(inputs, "inputs"), None)], False
    if not isinstance(inputs, list):
        raise RequestError(400, f'"inputs" must be a string, a pair [text, pair] or a batch [[text], ...], '
                                f"got {type(inputs).__name__}")
    if not inputs:
        raise RequestError(400, '"inputs" is an empty list')
    if not isinstance(inputs[0], list):   # one sequence: [text] or [text, pair]
        if len(inputs) > 2:
            raise RequestError(400, f'"inputs" has {len(inputs)} strings: one text is "text" or ["text"], a pair '
                                    '["text", "pair"], a batch [["text"], ["text", "pair"], ...]')
        return [_item(inputs, "inputs")], False
    count_inputs(len(inputs), max_inputs)
    for i, value in enumerate(inputs):
        if not isinstance(value, list):
            raise RequestError(400, f'"inputs[{i}]" must be a list ([text] or [text, pair]) like "inputs[0]", '
                                    f"got {type(value).__name__}")
    return [_item(value, f"inputs[{i}]") for i, value in enumerate(inputs)], True

