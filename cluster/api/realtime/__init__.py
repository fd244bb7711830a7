"""`/v1/realtime`: live calls over the OpenAI Realtime (GA) WebSocket protocol, on `CallSession`.

The official `openai` SDK, pipecat's and LiveKit's OpenAI-realtime services connect by changing only their base
URL. `Authorization: Bearer <key>` on the handshake names the tenant (from a browser: the subprotocol
`openai-insecure-api-key.<key>`, see `endpoint`); `?session_id=` resumes a session (its voice, instructions and
history), so a dropped connection can reconnect and go on. Every message is one JSON text frame.

- `endpoint`: the handshake (the tenant, the call's admission, refusals);
- `connection`: one call, from client events to the CallSession and from CallEvents to server events;
- `events`: the wire events, typed.

Client events: session.update, input_audio_buffer.append|commit|clear, conversation.item.create (a user
message: input_text / input_audio), conversation.item.truncate, conversation.item.delete, response.create,
response.cancel. Server events use the GA names (response.output_audio.delta, ...); the beta spellings are
accepted on input (input_audio_format, turn_detection and voice at the session's top level). Anything malformed
or out of order gets an `error` event with a code, and the call goes on.

A long call: `session.truncation` ("auto", "disabled" or {"type": "retention_ratio", ...}, GA semantics) says
what happens when the conversation outgrows the Reasoner's context. Items that truncation drops are gone from
the conversation, and the client hears `conversation.item.deleted` for each, as for an item it deletes itself.
"""

from cluster.api.realtime.endpoint import router

__all__ = ["router"]
