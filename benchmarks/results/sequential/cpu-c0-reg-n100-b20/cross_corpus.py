"""WordNet minus sampled C_0, paired over the same cases (bootstrap 95 % CI, 2,000 resamples, seed 0)."""
import json, random, sys
metrics = ["efficacy", "generalization", "specificity", "fluency"]
def scores(folder, method):
    return {s["case_id"]: s for s in json.load(open(f"{folder}/results.json"))["methods"][method]["scores"]}
rows = []
for pair, methods in (("alphaedit", ["AlphaEdit", "AlphaEdit_BLUE"]), ("memit", ["MEMIT", "MEMIT_BLUE"])):
    try:
        a_all = {m: scores(f"wordnet-ref-{pair}", m) for m in methods}
        b_all = {m: scores(f"sampled-ref-{pair}", m) for m in methods}
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
print("| method (WordNet minus sampled) | efficacy | generalization | specificity | fluency |")
print("|---|---|---|---|---|")
print("\n".join(rows))
