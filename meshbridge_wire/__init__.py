"""The CA service ↔ agent contract, imported by both sides and importing neither.

- `names`: DNS labels and names, service names, serials, SPIFFE identities (pure checks).
- `protocols`: Istio's port protocol names, and the subset the gateways carry across clusters.
- `models`: the request and response bodies of the REST API (pydantic).
- `logs`: the JSON-lines log formatter both processes use, with its redaction of secrets.
"""
