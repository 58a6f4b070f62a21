"""``ferrum serve``: load a model and run the app under uvicorn until SIGINT/SIGTERM.

On a signal uvicorn stops accepting connections and waits for open ones.
In-flight requests get ``shutdown_timeout`` seconds to finish; then Ferrum
aborts what is left in the engine, so each of those responses ends properly
(a stream with an error event and ``[DONE]``, a plain request with a 503)
instead of being cut by uvicorn cancelling its task.
"""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import dataclass

from ferrum.engine import EngineConfig
from ferrum.errors import ConfigError
from ferrum.model import ProgressFn
from ferrum.recurrent.snapshots import DEFAULT_BUDGET
from ferrum.spec import SpeculativeConfig


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``ferrum serve`` takes (see ``ferrum serve --help``)."""

    model: str | None = None  # folder, .gguf file or Hugging Face repo id; None = the embedded default model
    backend: str | None = None
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    max_num_seqs: int = 64
    max_queue: int = 256
    max_seq_len: int | None = None
    num_kv_blocks: int | None = None
    api_key: str | None = None
    adapters: tuple[tuple[str, str], ...] = ()  # (name, folder): LoRA adapters clients select with ``model``
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    reasoning_parser: str | None = None  # thinking (<think>...</think>) returned apart as reasoning_content
    chat_template: str | None = None  # Jinja text rendering chats instead of the model's
    speculative: SpeculativeConfig | None = None  # speculative decoding for every request
    draft_model: str | None = None  # with speculative method "draft": the drafting model's folder, file or repo id
    prefix_state_bytes: int = DEFAULT_BUDGET  # hybrid models: recurrent states the prefix cache may keep


def load_for_serving(options: ServeOptions, progress: ProgressFn | None = None):
    """The LLM and the app serving it."""
    import ferrum
    from ferrum.serve.app import ServeConfig, create_app
    from ferrum.serve.reasoning import PARSERS

    if options.reasoning_parser not in (None, *PARSERS):
        raise ConfigError(f"--reasoning-parser {options.reasoning_parser!r} is not one of {', '.join(PARSERS)}")

    model = options.model
    if model is None:
        from ferrum.default_model import GGUF_FILE, default_model_path

        path, default_name = default_model_path(progress=progress), GGUF_FILE.split(".")[0]
    else:
        path, default_name = model, model
    llm = ferrum.load(
        path, backend=options.backend, dtype=options.dtype, max_seq_len=options.max_seq_len,
        num_kv_blocks=options.num_kv_blocks, progress=progress,
        speculative=options.speculative, draft_model=options.draft_model,
        engine_config=EngineConfig(
            max_num_seqs=options.max_num_seqs, max_num_batched_tokens=max(2048, options.max_num_seqs),
            prefix_state_bytes=options.prefix_state_bytes,
        ),
    )
    if options.chat_template is not None:
        llm.use_chat_template(options.chat_template)
    for name, folder in options.adapters:
        llm.load_adapter(name, folder)
    names = options.served_model_names or (default_name,)
    app = create_app(llm, ServeConfig(model_names=tuple(names), api_key=options.api_key, max_queue=options.max_queue,
                                      reasoning_parser=options.reasoning_parser))
    return llm, app


def _bound_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use (or a host that is not this machine's)
    fails at once, not after minutes of loading."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise ConfigError(f"--host {host!r} does not resolve: {error.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}; choose another --port or --host"
                          ) from None
    return sock


def _address(sock: socket.socket) -> str:
    """The URL the server answers at: the port the system chose for --port 0, an IPv6 host in brackets."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def serve(options: ServeOptions, progress: ProgressFn | None = None) -> None:
    import uvicorn

    sock = _bound_socket(options.host, options.port)
    llm, app = load_for_serving(options, progress)
    info = llm.model.backend.info
    print(
        f"[ferrum] serving {', '.join(app.state.ferrum.model_names)} on {_address(sock)}/v1 "
        f"(backend={llm.model.backend.name} device={info.device} dtype={llm.model.dtype})",
        file=sys.stderr, flush=True,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                timer = threading.Timer(options.shutdown_timeout, llm.async_engine.shutdown)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_level=options.log_level,
        # A backstop only: the engine shutdown above ends every response well before it.
        timeout_graceful_shutdown=options.shutdown_timeout + 30,
    )
    Server(config).run(sockets=[sock])
