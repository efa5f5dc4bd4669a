"""The pieces of `sidecar inspect`; sidecar/tools/inspect/command.py is the command that joins them.

pem (bytes -> certificates), certview (one certificate in words), validity (its time
window), chain (the bounded issuer walk), report (one file's findings), render (text and
JSON), files (the disk). All but files are pure.
"""
