"""The serving layer, between the front ends (server/routes, webui) and the engine.

Each front end parses its wire format (protocol/), makes one call here with a transport-neutral
request and a `Caller`, and writes what comes back. Prompt building and fitting, knowledge-base
grounding, `n` choices, observation and disconnect handling happen here, once:

    chat.py      Turn / ChatCall / CompletionCall -> ChatServing -> Generation (the entry points)
    prompts.py   conversation, messages or text -> one fitted GenerationRequest (+ grounding)
    choices.py   Generation: the started choice streams, merged or collected whole
    observe.py   RoundObserver (metrics, history export, access-log tokens), Progress, EngineWatch
    tools.py     tool calling: grammar, prompt with tools, calls out of the answer
    caller.py    Caller (request id, client, session, arrival, is_disconnected), RequestInfo

Nothing here imports FastAPI or Starlette.
"""
