"""Remote reward faults against misbehaving servers on 127.0.0.1: a drip-feeding server cannot
stretch the timeout, replies are size-capped, only real numbers are scores, protocol errors surface
as one named error (reward + URL), redirects never leave the host, retries/backoff come from the
config."""

import json
import os
import socket
import threading
import time

import numpy as np
import pytest

from htgrpo_jax import tasks
from htgrpo_jax.rewards import remote

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RawServer:
  """A TCP server answering every connection with ``script(conn)`` after reading the request.

  ``requests`` collects (request line, body) pairs; ``host`` may be another loopback address.
  """

  def __init__(self, script, host="127.0.0.1"):
    self.script, self.requests = script, []
    self.sock = socket.create_server((host, 0))
    self.url = f"http://{host}:{self.sock.getsockname()[1]}/score"
    self._stop = False
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self):
    while not self._stop:
      try:
        conn, _ = self.sock.accept()
      except OSError:
        return
      threading.Thread(target=self._one, args=(conn,), daemon=True).start()

  def _one(self, conn):
    with conn:
      f = conn.makefile("rb")
      line = f.readline().decode()
      length = 0
      while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
          break
        if h.lower().startswith(b"content-length:"):
          length = int(h.split(b":")[1])
      self.requests.append((line.strip(), f.read(length) if length else b""))
      try:
        self.script(conn)
      except OSError:
        pass

  def close(self):
    self._stop = True
    self.sock.close()


def _ok(body: bytes, status=b"200 OK", extra=b""):
  def script(conn):
    conn.sendall(
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )

  return script


@pytest.fixture
def serve():
  servers = []

  def make(script, host="127.0.0.1"):
    servers.append(RawServer(script, host))
    return servers[-1]

  yield make
  for s in servers:
    s.close()


def _call(url, n=2, **kw):
  kw.setdefault("backoff", 0.01)
  return remote.RemoteReward(url, name="geneval", **kw)(["a photo of a circle"] * n, np.zeros((n, 8, 8, 3), np.uint8))


def test_drip_feeding_server_cannot_stretch_the_timeout(serve):
  def drip(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n")
    for _ in range(400):
      conn.sendall(b" ")
      time.sleep(0.1)

  srv = serve(drip)
  t = time.monotonic()
  with pytest.raises(ValueError, match=r"'geneval'.*127\.0\.0\.1.*(deadline|timed out)"):
    _call(srv.url, timeout=1.0, max_retries=0)
  assert time.monotonic() - t < 2.5


def test_drip_fed_headers_cannot_stretch_it_either(serve):
  def drip(conn):
    for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 400:
      conn.sendall(bytes([b]))
      time.sleep(0.05)

  srv = serve(drip)
  t = time.monotonic()
  with pytest.raises(ValueError, match="geneval"):
    _call(srv.url, timeout=1.0, max_retries=1)
  assert time.monotonic() - t < 4.0  # two attempts of at most 1 s, plus backoff


def test_reply_size_is_capped(serve):
  def huge(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")  # no length
    chunk = b"[" * 65536
    for _ in range(64):
      conn.sendall(chunk)

  srv = serve(huge)
  with pytest.raises(ValueError, match=r"'geneval'.*larger than 1048576 bytes"):
    _call(srv.url, max_reply_bytes=1 << 20, max_retries=0)
  declared = serve(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n{"))
  with pytest.raises(ValueError, match="larger than"):
    _call(declared.url, max_reply_bytes=1 << 20, max_retries=0)


@pytest.mark.parametrize(
    "scores,match",
    [
        (["0.5", "0.5"], "element 0 is '0.5'"),
        ([True, False], "element 0 is True"),
        ([0.5, None], "element 1 is None"),
        ([[0.5], [0.5]], r"element 0 is \[0.5\]"),
        ({"a": 1}, "list"),
    ],
)
def test_only_real_numbers_are_scores(serve, scores, match):
  srv = serve(_ok(json.dumps({"scores": scores}).encode()))
  with pytest.raises(ValueError, match=r"'geneval'.*" + match):
    _call(srv.url, max_retries=0)


def test_integers_are_real_numbers(serve):
  srv = serve(_ok(json.dumps({"scores": [1, 0]}).encode()))
  np.testing.assert_array_equal(_call(srv.url), [1.0, 0.0])


@pytest.mark.parametrize(
    "case,script,match",
    [
        ("bad_status_line", lambda c: c.sendall(b"HELLO THERE\r\n\r\n"), "BadStatusLine"),
        (
            "incomplete_read",
            lambda c: c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"sco'),
            "IncompleteRead",
        ),
        ("overflow", _ok(b'{"scores": [' + b"9" * 400 + b", 0.5]}"), "does not fit"),
        ("not_utf8", _ok(b'{"scores": [0.5, 0.5], "note": "\xff\xfe"}'), "not UTF-8"),
        ("empty_reply", lambda c: None, "RemoteDisconnected"),
    ],
)
def test_protocol_errors_surface_as_one_named_error(serve, case, script, match):
  srv = serve(script)
  with pytest.raises(remote.RemoteRewardError) as e:
    _call(srv.url, max_retries=1, timeout=2.0)
  msg = str(e.value)
  assert "'geneval'" in msg and srv.url in msg and match in msg, msg
  # Transport failures are retried (bounded); a malformed but complete reply is not.
  assert len(srv.requests) == (2 if case in ("bad_status_line", "incomplete_read", "empty_reply") else 1)


@pytest.mark.parametrize("code", [b"302 Found", b"303 See Other", b"307 Temporary Redirect", b"308 Permanent Redirect"])
def test_redirects_to_another_host_are_not_followed(serve, code):
  other = serve(_ok(json.dumps({"scores": [1.0, 1.0]}).encode()), host="127.0.0.2")
  srv = serve(_ok(b"", status=code, extra=b"Location: " + other.url.encode() + b"\r\n"))
  with pytest.raises(remote.RemoteRewardError, match=r"redirect.*127\.0\.0\.2"):
    _call(srv.url, max_retries=2)
  assert other.requests == [] and len(srv.requests) == 1


def test_same_host_307_is_followed_with_the_post(serve):
  hops = []

  def script(conn):
    if not hops:
      hops.append(1)
      conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /v2/score\r\nContent-Length: 0\r\n\r\n")
    else:
      _ok(json.dumps({"scores": [0.25, 0.75]}).encode())(conn)

  srv = serve(script)
  np.testing.assert_array_equal(_call(srv.url), np.float32([0.25, 0.75]))
  assert [r[0] for r in srv.requests] == ["POST /score HTTP/1.1", "POST /v2/score HTTP/1.1"]
  assert srv.requests[0][1] == srv.requests[1][1] and srv.requests[1][1]


def test_unreachable_server_error_names_reward_and_url():
  with pytest.raises(remote.RemoteRewardError, match=r"'geneval' at http://127\.0\.0\.1:9/.*2 attempts"):
    _call("http://127.0.0.1:9/", max_retries=1, timeout=1.0)


def _t2i_config(**world):
  cfg = tasks.load_config_file(os.path.join(REPO, "configs", "mmada_geneval.py"))
  cfg.world.reward_url = "http://127.0.0.1:9/score"
  for k, v in world.items():
    cfg.world[k] = v
  return cfg


def test_retries_and_backoff_come_from_the_config(monkeypatch):
  made = []
  real = remote.RemoteReward.__init__

  def spy(self, url, **kw):
    made.append(kw)
    real(self, url, **kw)

  monkeypatch.setattr(remote.RemoteReward, "__init__", spy)
  cfg = _t2i_config(reward_retries=5, reward_backoff_s=0.25)
  with pytest.raises(ValueError, match="world.train_prompts"):  # the rewards are built first
    tasks.build_task(cfg, log=lambda s: None)
  assert [(m["max_retries"], m["backoff"]) for m in made] == [(5, 0.25), (5, 0.25)]


@pytest.mark.parametrize("key,value", [("reward_retries", -1), ("reward_backoff_s", -0.1), ("reward_timeout", 0.0)])
def test_bad_reward_settings_are_named(key, value):
  with pytest.raises(ValueError, match=f"world.{key}"):
    tasks.build_task(_t2i_config(**{key: value}), log=lambda s: None)
