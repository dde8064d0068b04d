"""The fleet dashboard at /ui/: pure renderers from the CA's read models to HTML and SVG strings.
Nothing here reads the store, answers HTTP or runs a script in the browser: ca_server/api/ui.py
gathers the data (the same functions as the admin API and `fleet check`) and serves the pages."""
