"""`postback-relay api`: HTTP ingest for backends not written in Python, in front of the same
Producer.produce_many as the Python helper (app.py: the routes; ingest.py: what a request does;
auth.py: clients and their limits; metrics.py: request metrics into Redis)."""
