"""The refusal of a model Hive cannot answer for correctly (UNSUPPORTED_MODEL): raised
where it is found (the packed attention, the recurrent state, the self-check),
ended as the job's error by worker/runtime.py. A leaf, so that each can raise it."""


class UnsupportedModel(Exception):
    code = "UNSUPPORTED_MODEL"
