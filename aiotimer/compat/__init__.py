"""Drop-in replacements for other watchdog timer APIs (``aiotimer.compat.torch``)."""
