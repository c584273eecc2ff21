"""POST /tokenize and /detokenize (vLLM's extras): the server's own tokenizer and chat template."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fusionserve.server.api.protocol import DetokenizeRequest, ProtocolError, TokenizeRequest, check_token_ids
from fusionserve.server.api.request_body import read_json
from fusionserve.server.api.state import app_state

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    st = app_state(request)
    st.check_api_key(request)
    req = await read_json(request, TokenizeRequest, st.settings.max_body_bytes)
    serving = st.serving
    serving.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ProtocolError("give exactly one of 'prompt' or 'messages'", param="prompt")
    tok = serving.tokenizer
    if req.messages is not None:
        msgs = [m.for_template() for m in req.messages]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=req.add_generation_prompt is not False)
        except Exception as exc:
            raise ProtocolError(f"messages cannot be rendered: {str(exc)[:300]}", param="messages") from None
        ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
    else:
        ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens is not False)
    return {"count": len(ids), "max_model_len": serving.limits.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    st = app_state(request)
    st.check_api_key(request)
    req = await read_json(request, DetokenizeRequest, st.settings.max_body_bytes)
    st.serving.check_model(req.model)
    check_token_ids(req.tokens, st.serving.limits, "tokens")
    return {"prompt": st.serving.tokenizer.decode(req.tokens, skip_special_tokens=False)}
