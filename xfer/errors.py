"""The one exception type xfer raises for problems a person can fix."""


class XferError(Exception):
    """A problem with the user's input or environment, worded for a person.

    The message is one paragraph that names the problem and the remedy. Entry
    scripts catch it once (``xfer.cli.run_main``) and print it without a traceback.
    """
