# Borg 1.2's own retention code as the oracle for Lifeboat's prune: reads timelines as JSON on
# stdin, prints the kept indexes per timeline. Run with TZ=UTC by Debian's python3 (where the
# borgbackup package installs borg).
import json
import sys
from collections import namedtuple
from datetime import datetime, timezone

from borg.helpers.misc import prune_split, PRUNING_PATTERNS

Archive = namedtuple("Archive", "id ts")
rule_names = {"last": "secondly", "hourly": "hourly", "daily": "daily", "weekly": "weekly",
              "monthly": "monthly", "yearly": "yearly"}
results = []
for case in json.load(sys.stdin):
    archives = [Archive(i, datetime.fromtimestamp(t, timezone.utc)) for i, t in enumerate(case["times"])]
    kept_because = {}
    keep = []
    for rule in PRUNING_PATTERNS.keys():
        for ours, theirs in rule_names.items():
            if theirs == rule and case["rules"].get(ours):
                keep += prune_split(archives, rule, case["rules"][ours], kept_because)
    results.append(sorted(a.id for a in keep))
json.dump(results, sys.stdout)
