"""The one error type of configuration problems; its message always names the dotted key."""


class ConfigError(ValueError):
    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config error at {key}: {problem}")
