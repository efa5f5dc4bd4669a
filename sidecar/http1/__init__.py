"""HTTP/1.1 as an http listener handles it: pure decisions on parsed messages, no I/O.

The bytes are parsed by httptools (llhttp, Node.js's parser, in C: strict by default and
~15x faster than h11 here); what llhttp tolerates and the sidecar refuses (a
Transfer-Encoding other than `chunked`, HTTP/1.0 with Transfer-Encoding, versions other
than 1.0 and 1.1, request targets other than origin-form, a missing or repeated Host) is
checked here, on what the parser reported. `proxy/http.py` drives the parsers and the
sockets and asks these modules what to do:

- `path`: the request path as the policy judges it and the app receives it;
- `request`: a request head's framing, what is forwarded, and why one is refused;
- `response`: an app response's framing and the head the caller receives;
- `answers`: the responses the sidecar writes itself (400, 403, 408, 502);
- `xfcc`: the `x-forwarded-client-cert` field, built once per connection.
"""
