"""Where new inputs come from: file watching, SIGHUP and the reload interval."""
