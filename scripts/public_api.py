#!/usr/bin/env python3
"""Lists a crate's public API, one item per line, from rustdoc's JSON output.

Usage: public_api.py target/doc/<crate>.json > api/<crate>.txt

What `cargo public-api` prints, written small: every item a user can name (modules, types, functions, methods,
fields, variants, trait items, constants, macros, trait implementations other than blanket and auto-trait ones),
under the path a user names it by (re-exports followed), with its signature. Items rustdoc hides
(`#[doc(hidden)]`, e.g. `__private`) are not in the JSON and so not listed. Lines are sorted, so a diff of two
listings shows what was added, removed or changed.
"""

import json
import sys


class Api:
    def __init__(self, doc):
        self.index = doc["index"]
        self.paths = doc["paths"]
        self.lines = set()
        self.seen = set()

    def item(self, id_):
        return self.index.get(str(id_))

    # ---- types -------------------------------------------------------------------------------------------

    def ty(self, t):
        if t is None:
            return "()"
        (kind, v), = t.items()
        if kind == "resolved_path":
            return v["path"] + self.args(v.get("args"))
        if kind == "generic":
            return v
        if kind == "primitive":
            return v
        if kind == "borrowed_ref":
            life = f"{v['lifetime']} " if v.get("lifetime") else ""
            mut = "mut " if v["is_mutable"] else ""
            return f"&{life}{mut}{self.ty(v['type'])}"
        if kind == "tuple":
            return "(" + ", ".join(self.ty(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        if kind == "slice":
            return f"[{self.ty(v)}]"
        if kind == "array":
            return f"[{self.ty(v['type'])}; {v['len']}]"
        if kind == "raw_pointer":
            return ("*mut " if v["is_mutable"] else "*const ") + self.ty(v["type"])
        if kind == "impl_trait":
            return "impl " + " + ".join(self.bound(b) for b in v)
        if kind == "dyn_trait":
            parts = [self.poly_trait(p) for p in v["traits"]]
            if v.get("lifetime"):
                parts.append(v["lifetime"])
            return "dyn " + " + ".join(parts)
        if kind == "function_pointer":
            sig = v["sig"]
            inputs = ", ".join(self.ty(t) for _, t in sig["inputs"])
            out = f" -> {self.ty(sig['output'])}" if sig.get("output") else ""
            return f"fn({inputs}){out}"
        if kind == "qualified_path":
            trait = v.get("trait")
            self_ty = self.ty(v["self_type"])
            if trait and trait["path"]:
                return f"<{self_ty} as {trait['path']}{self.args(trait.get('args'))}>::{v['name']}"
            return f"{self_ty}::{v['name']}"
        if kind == "infer":
            return "_"
        if kind == "pat":
            return self.ty(v["type"])
        return kind

    def args(self, a):
        if not a:
            return ""
        if "angle_bracketed" in a:
            ab = a["angle_bracketed"]
            parts = []
            for arg in ab["args"]:
                if arg == "infer":
                    parts.append("_")
                    continue
                (k, x), = arg.items()
                if k == "type":
                    parts.append(self.ty(x))
                elif k == "lifetime":
                    parts.append(x)
                elif k == "const":
                    parts.append(x.get("expr", "_"))
            for c in ab["constraints"]:
                binding = c["binding"]
                if "equality" in binding:
                    eq = binding["equality"]
                    value = self.ty(eq["type"]) if "type" in eq else eq.get("constant", {}).get("expr", "_")
                    parts.append(f"{c['name']} = {value}")
                else:
                    parts.append(f"{c['name']}: " + " + ".join(self.bound(b) for b in binding["constraint"]))
            return "<" + ", ".join(parts) + ">" if parts else ""
        if "parenthesized" in a:
            p = a["parenthesized"]
            out = f" -> {self.ty(p['output'])}" if p.get("output") else ""
            return "(" + ", ".join(self.ty(t) for t in p["inputs"]) + ")" + out
        return ""

    def poly_trait(self, p):
        t = p["trait"]
        return t["path"] + self.args(t.get("args"))

    def bound(self, b):
        (k, v), = b.items()
        if k == "trait_bound":
            modifier = {"maybe": "?", "maybe_const": "~const "}.get(v.get("modifier"), "")
            hrtb = self.hrtb(v.get("generic_params"))
            return hrtb + modifier + v["trait"]["path"] + self.args(v["trait"].get("args"))
        if k == "outlives":
            return v
        if k == "use":
            return "use<" + ", ".join(str(x) for x in v) + ">"
        return k

    def hrtb(self, params):
        if not params:
            return ""
        return "for<" + ", ".join(p["name"] for p in params) + "> "

    def generics(self, g):
        params = []
        for p in g["params"]:
            (k, v), = p["kind"].items()
            if k == "type":
                if v.get("is_synthetic"):
                    continue  # `impl Trait` in argument position
                bounds = " + ".join(self.bound(b) for b in v["bounds"])
                params.append(p["name"] + (f": {bounds}" if bounds else ""))
            elif k == "lifetime":
                params.append(p["name"])
            elif k == "const":
                params.append(f"const {p['name']}: {self.ty(v['type'])}")
        return "<" + ", ".join(params) + ">" if params else ""

    def where_clause(self, g):
        preds = []
        for w in g["where_predicates"]:
            (k, v), = w.items()
            if k == "bound_predicate":
                preds.append(
                    self.hrtb(v.get("generic_params")) + self.ty(v["type"]) + ": "
                    + " + ".join(self.bound(b) for b in v["bounds"])
                )
            elif k == "lifetime_predicate":
                preds.append(v["lifetime"] + ": " + " + ".join(v["outlives"]))
            elif k == "eq_predicate":
                preds.append(f"{self.ty(v['lhs'])} = {self.ty(v['rhs'].get('type'))}")
        return " where " + ", ".join(preds) if preds else ""

    def fn_sig(self, name, f):
        h = f["header"]
        quals = "".join(
            q for q, on in (("const ", h["is_const"]), ("async ", h["is_async"]), ("unsafe ", h["is_unsafe"])) if on
        )
        inputs = []
        for arg, t in f["sig"]["inputs"]:
            if arg == "self":
                rendered = self.ty(t)
                inputs.append({"Self": "self", "&Self": "&self", "&mut Self": "&mut self"}.get(rendered, f"self: {rendered}"))
            else:
                inputs.append(f"{arg}: {self.ty(t)}")
        out = f" -> {self.ty(f['sig']['output'])}" if f["sig"].get("output") else ""
        return f"{quals}fn {name}{self.generics(f['generics'])}({', '.join(inputs)}){out}{self.where_clause(f['generics'])}"

    # ---- items -------------------------------------------------------------------------------------------

    def add(self, line):
        self.lines.add(line)

    def module(self, id_, path):
        if (id_, tuple(path)) in self.seen:
            return
        self.seen.add((id_, tuple(path)))
        module = self.item(id_)
        for child in module["inner"]["module"]["items"]:
            self.child(child, path)

    def child(self, id_, path, name=None):
        item = self.item(id_)
        if item is None or item["visibility"] != "public" and "use" not in item["inner"]:
            return
        (kind, inner), = item["inner"].items()
        if kind == "use":
            if item["visibility"] != "public":
                return
            target = inner.get("id")
            if target is not None and self.item(target) is not None:
                if inner["is_glob"]:
                    if "module" in self.item(target)["inner"]:
                        for c in self.item(target)["inner"]["module"]["items"]:
                            self.child(c, path)
                    return
                self.child(target, path, inner["name"])
            else:
                self.add(f"pub use {'::'.join(path)}::{inner['name']} = {inner['source']}")
            return
        name = name or item["name"]
        full = "::".join(path + [name])
        if kind == "module":
            self.add(f"pub mod {full}")
            self.module(id_, path + [name])
        elif kind == "function":
            self.add(f"pub {self.fn_sig(full, inner)}")
        elif kind == "struct":
            self.add(f"pub struct {full}{self.generics(inner['generics'])}")
            k = inner["kind"]
            fields = k.get("plain", {}).get("fields", []) if isinstance(k, dict) else []
            if isinstance(k, dict) and "tuple" in k:
                fields = [f for f in k["tuple"] if f is not None]
            for f in fields:
                fi = self.item(f)
                if fi and fi["visibility"] == "public":
                    self.add(f"pub {full}::{fi['name']}: {self.ty(fi['inner']['struct_field'])}")
            self.impls(inner["impls"], full)
        elif kind == "enum":
            self.add(f"pub enum {full}{self.generics(inner['generics'])}")
            for v in inner["variants"]:
                vi = self.item(v)
                vk = vi["inner"]["variant"]["kind"]
                if vk == "plain":
                    self.add(f"pub {full}::{vi['name']}")
                elif "tuple" in vk:
                    types = [self.ty(self.item(f)["inner"]["struct_field"]) for f in vk["tuple"] if f is not None]
                    self.add(f"pub {full}::{vi['name']}({', '.join(types)})")
                else:
                    fields = [self.item(f) for f in vk["struct"]["fields"]]
                    rendered = ", ".join(f"{f['name']}: {self.ty(f['inner']['struct_field'])}" for f in fields)
                    self.add(f"pub {full}::{vi['name']} {{ {rendered} }}")
            self.impls(inner["impls"], full)
        elif kind == "union":
            self.add(f"pub union {full}")
            self.impls(inner["impls"], full)
        elif kind == "trait":
            unsafe = "unsafe " if inner["is_unsafe"] else ""
            bounds = " + ".join(self.bound(b) for b in inner["bounds"])
            self.add(f"pub {unsafe}trait {full}{self.generics(inner['generics'])}" + (f": {bounds}" if bounds else ""))
            for i in inner["items"]:
                self.assoc(self.item(i), full)
        elif kind == "type_alias":
            self.add(f"pub type {full}{self.generics(inner['generics'])} = {self.ty(inner['type'])}")
        elif kind == "constant":
            self.add(f"pub const {full}: {self.ty(inner['type'])}")
        elif kind == "static":
            self.add(f"pub static {full}: {self.ty(inner['type'])}")
        elif kind in ("macro", "proc_macro"):
            self.add(f"pub macro {full}")
        else:
            self.add(f"pub {kind} {full}")

    def assoc(self, item, owner):
        if item is None:
            return
        (kind, inner), = item["inner"].items()
        if kind == "function":
            self.add(f"pub {self.fn_sig(owner + '::' + item['name'], inner)}")
        elif kind == "assoc_const":
            self.add(f"pub const {owner}::{item['name']}: {self.ty(inner['type'])}")
        elif kind == "assoc_type":
            bounds = " + ".join(self.bound(b) for b in inner.get("bounds", []))
            self.add(f"pub type {owner}::{item['name']}" + (f": {bounds}" if bounds else ""))

    def impls(self, ids, owner):
        for i in ids:
            item = self.item(i)
            imp = item["inner"]["impl"]
            if imp["is_synthetic"] or imp["blanket_impl"] is not None:
                continue
            if imp["trait"] is None:
                for m in imp["items"]:
                    mi = self.item(m)
                    if mi is not None and mi["visibility"] == "public":
                        self.assoc(mi, owner)
            else:
                if imp["trait"]["path"] == "StructuralPartialEq":
                    continue  # the compiler's marker for `derive(PartialEq)`, implied by the `PartialEq` line
                neg = "!" if imp["is_negative"] else ""
                trait = imp["trait"]["path"] + self.args(imp["trait"].get("args"))
                self.add(
                    f"impl{self.generics(imp['generics'])} {neg}{trait} for {owner}"
                    + self.where_clause(imp["generics"])
                )


def main():
    doc = json.load(open(sys.argv[1]))
    api = Api(doc)
    root = api.item(doc["root"])
    api.module(doc["root"], [root["name"]])
    for line in sorted(api.lines):
        print(line)


if __name__ == "__main__":
    main()
