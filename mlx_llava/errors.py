"""The one exception type for problems a user can fix (bad input, missing
files, unsupported architectures). The CLI prints it as one line; programming
errors still raise normally."""


class LlavaError(Exception):
    pass
