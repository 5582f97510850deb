"""Chat pieces with no I/O: the task's machine, request and callback checks, settings."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from statemachine.exceptions import TransitionNotAllowed

from emulators.execution import answer, options
from orchestrator.config import load_settings
from orchestrator.errors import ConfigError, InvalidInput
from sagas.chat import ChatSettings, ChatTask, validate_message, validate_session_request
from sagas.chat.store import Rejected, bad_after_seq, parse_callback

CHAT = ChatSettings()


def machine(**env: str) -> tuple[ChatTask, SimpleNamespace]:
    model = SimpleNamespace(id="t-1", state=None,
                            context={"input": {"session_id": "s-1", "message": "hi", "config": {"k": 1}}})
    settings = load_settings(environ=env, dotenv="/nonexistent")
    return ChatTask(model=model, settings=settings), model


def test_dispatching_a_task_sends_it_to_the_execution_queue():
    m, model = machine(CHAT_CONSUMER_ID="replica-a", CHAT_TASK_TIMEOUT_SECONDS="9")
    assert model.state == "queued"
    m.dispatch(None, m.task_token("execute", -1, None, 0), 1)  # what the engine calls on entering `execute`
    [(channel, target, key, payload)] = m.messages
    assert (channel, target, key) == ("celery", "execution.chat_task", "s-1")
    name, [message] = payload["task"]
    assert name == "execution.chat_task"
    assert message == {"task_id": "t-1", "session_id": "s-1", "message": "hi", "config": {"k": 1},
                       "callback_channel": "callback:replica-a", "callback_stream": "chat:callbacks:replica-a",
                       "timeout_seconds": 9.0}


def test_lifecycle_and_illegal_events():
    m, model = machine()
    m.send("start")
    m.send("stream")
    m.send("complete", payload={"result": {"text": "x"}})
    assert model.state == "completed" and model.context["result"] == {"text": "x"}
    with pytest.raises(TransitionNotAllowed):
        m.send("complete", payload={"error": "late"})
    m2, model2 = machine()
    m2.send("fail", payload={"error": "job timed out after 0.1 minutes"})  # the engine's deadline
    assert model2.state == "timed_out" and "timed out" in model2.context["error"]
    assert m2.messages[-1][1] == "chat.task_timed_out"
    m3, model3 = machine()
    m3.send("start")
    m3.send("complete", payload={"error": {"code": "boom"}})  # the final callback was an error
    assert model3.state == "failed" and model3.context["error"] == {"code": "boom"}


def test_message_checks_name_the_field_and_the_limit():
    assert validate_message({"message": "ok"}, CHAT) == {"message": "ok"}
    for body, words in (({}, "is required"), ({"message": ""}, "must not be empty"),
                        ({"message": " "}, "must not be empty"), ({"message": 1}, "must be a string")):
        with pytest.raises(InvalidInput, match=words) as exc:
            validate_message(body, CHAT)
        assert exc.value.field == "message" and exc.value.status == 400
    with pytest.raises(InvalidInput) as exc:
        validate_message({"message": "x" * 4001}, CHAT)
    assert exc.value.status == 413 and "4000" in exc.value.problem and "CHAT_MAX_MESSAGE_CHARS" in exc.value.problem


def test_session_request_checks():
    assert validate_session_request({}, CHAT) == (None, {})
    assert validate_session_request({"config": {"a": 1}, "user_id": "u"}, CHAT) == ("u", {"a": 1})
    for body, field in (([], "body"), ({"x": 1}, "x"), ({"config": []}, "config"), ({"user_id": ""}, "user_id"),
                        ({"config": {"a": "b" * 20000}}, "config")):
        with pytest.raises(InvalidInput) as exc:
            validate_session_request(body, CHAT)
        assert exc.value.field == field


def test_callback_shape():
    good = {"session_id": "s", "task_id": "t", "seq": 1, "type": "chunk", "result": {"text": "a"}, "extra": 1}
    assert parse_callback(good) == {k: v for k, v in good.items() if k != "extra"}
    for raw, words in (("{", "not JSON"), ("[]", "JSON object"), ({**good, "seq": 0}, "seq"),
                       ({**good, "seq": True}, "seq"), ({**good, "type": "x"}, "type"),
                       ({**good, "session_id": ""}, "session_id"), ({k: v for k, v in good.items() if k != "result"},
                                                                    "result")):
        with pytest.raises(Rejected, match=words):
            parse_callback(raw)
    # a key given twice is named as such (it was "body: not JSON")
    with pytest.raises(Rejected, match="^malformed: seq: appears twice in an object$"):
        parse_callback('{"session_id": "s", "task_id": "t", "seq": 1, "seq": 2, "type": "chunk", "result": 1}')


def test_after_seq_and_settings():
    assert bad_after_seq("7") == 7
    for raw in ("-1", "x", None):
        with pytest.raises(InvalidInput):
            bad_after_seq(raw)
    env = {"CHAT_MAX_MESSAGE_CHARS": "10", "CHAT_CONSUMER_ID": "c1", "REDIS_URL": "redis://r:6379/2"}
    chat = ChatSettings.from_settings(load_settings(environ=env, dotenv="/nonexistent"))
    assert (chat.max_message_chars, chat.callback_channel, chat.redis_url) == (10, "callback:c1", "redis://r:6379/2")
    for name, value in (("CHAT_MAX_MESSAGE_CHARS", "lots"), ("CHAT_HEARTBEAT_SECONDS", "0"),
                        ("CHAT_CONSUMER_ID", "has space")):
        with pytest.raises(ConfigError) as exc:
            ChatSettings.from_settings(load_settings(environ={name: value}, dotenv="/nonexistent"))
        assert exc.value.variable == name


def test_emulator_answer_and_options():
    pieces = answer("hi", 3)
    assert len(pieces) == 3 and "".join(pieces).startswith("You said: hi.")
    assert options({"emulator": {"chunks": 5, "nonsense": 1}})["chunks"] == 5
    assert options({})["chunks"] == 3 and options({})["failure_rate"] == 0
