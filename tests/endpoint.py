"""A scripted HTTP endpoint on 127.0.0.1 for tests that talk to OpenAI-compatible servers.

Subclasses answer each POST in `answer(path, authorization, body) -> (status, JSON)`;
the server stops itself after `lifetime` seconds whatever happens.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


class Endpoint:
    def __init__(self, lifetime: float = 120):
        self.requests = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, answer = endpoint.answer(self.path, self.headers.get("Authorization"), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime, self.server.shutdown)

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, authorization, body: dict) -> tuple:
        raise NotImplementedError
