"""Configuration A minus configuration B, paired over the same cases (bootstrap 95 % CI, 2,000
resamples, seed 0): `python cross_corpus.py [A B]`, A and B folder prefixes such as `wordnet-ref`
(default: wordnet-ref sampled-ref; also both-ref, wordnet-rome)."""
import json, random, sys
metrics = ["efficacy", "generalization", "specificity", "fluency"]
A, B = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else ("wordnet-ref", "sampled-ref")
def scores(folder, method):
    return {s["case_id"]: s for s in json.load(open(f"{folder}/results.json"))["methods"][method]["scores"]}
rows = []
for pair, methods in (("alphaedit", ["AlphaEdit", "AlphaEdit_BLUE"]), ("memit", ["MEMIT", "MEMIT_BLUE"])):
    try:
        a_all = {m: scores(f"{A}-{pair}", m) for m in methods}
        b_all = {m: scores(f"{B}-{pair}", m) for m in methods}
    except (FileNotFoundError, KeyError):
        continue
    for m in methods:
        a, b = a_all[m], b_all[m]
        ids = sorted(set(a) & set(b), key=str)
        cells = []
        for k in metrics:
            d = [(a[i][k] - b[i][k]) * 100 for i in ids]
            rng = random.Random(0)
            boots = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(2000))
            cells.append(f"{sum(d)/len(d):+.1f} [{boots[49]:+.1f}, {boots[1949]:+.1f}]")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
print(f"| method ({A} minus {B}) | efficacy | generalization | specificity | fluency |")
print("|---|---|---|---|---|")
print("\n".join(rows))
