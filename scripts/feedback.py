#!/usr/bin/env python3
"""Plays users of a served model line: each row of a labeled CSV file
(the occupancy format) is sent to `dsv serve` with its own routing key,
then its true label comes back as feedback, until the server's canary gate
decides (or the rows run out). Prints what each model answered and the
decision.

    scripts/feedback.py http://127.0.0.1:PORT PROJECT/NAME FILE.csv
"""
import csv
import http.client
import json
import sys
import urllib.parse

FEATURES = ["Temperature", "Humidity", "Light", "CO2", "HumidityRatio"]


def main():
    url, line, path = sys.argv[1:4]
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)

    def post(what, body, headers=None):
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        conn.request("POST", f"/v1/models/{line}/{what}", json.dumps(body), h)
        r = conn.getresponse()
        data = json.loads(r.read() or b"null")
        if r.status != 200:
            sys.exit(f"{what}: HTTP {r.status}: {data}")
        return data

    answered = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip('"') for h in rows[0]]
    # Data rows carry a leading row number the header does not name.
    off = len(rows[1]) - len(header)
    at = {name: header.index(name) + off for name in FEATURES + ["Occupancy"]}
    sent = 0
    for i, r in enumerate(rows[1:]):
        row = {k: float(r[at[k]]) for k in FEATURES}
        p = post("predict", row, {"x-dsv-key": f"user-{i}"})
        answered[p["role"]] = answered.get(p["role"], 0) + 1
        fb = post("feedback", {"request_id": p["request_id"], "label": float(r[at["Occupancy"]])})
        sent += 1
        if fb.get("decision"):
            print(f"after {sent} labeled requests ({answered}): {fb['decision']}")
            return
    print(f"no decision after {sent} labeled requests ({answered})")


if __name__ == "__main__":
    main()
