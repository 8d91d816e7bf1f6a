//! Reads `#[grain]` input into a model; only syntax errors are reported here, misuse is for `validate`.

use proc_macro2::TokenStream;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ExprLit, FnArg, Ident, ImplItem, ImplItemFn, Lit, LitStr, Meta, Pat, Token, Type};

/// `#[grain(...)]` on a struct.
pub(crate) struct GrainStruct {
    pub(crate) item: syn::ItemStruct,
    pub(crate) name: Option<LitStr>,
    pub(crate) idle_timeout: Option<LitStr>,
    pub(crate) placement: Option<LitStr>,
    pub(crate) fields: Vec<GrainField>,
}

/// How a field of a grain struct is filled when the grain activates.
pub(crate) enum FieldInit {
    /// `PersistentState<T>`: loaded from storage under this state name.
    State(LitStr),
    /// `Journaled<S>`: recovered from the journal of this name, snapshotting every `snapshot_every` events.
    Journal { name: LitStr, snapshot_every: u64 },
    /// `GrainContext`: a clone of the activation's context.
    Context,
    /// Anything else: `Default::default()`.
    Default,
}

pub(crate) struct GrainField {
    pub(crate) ident: Ident,
    pub(crate) init: FieldInit,
    /// A `#[journal]` attribute on a field that is not `Journaled<S>`, or `#[state]` on one that is.
    pub(crate) misplaced: Vec<Attribute>,
}

/// `#[grain]` on an impl block.
pub(crate) struct GrainImpl {
    pub(crate) item: syn::ItemImpl,
    /// `#[grain(http)]`: every method is served over HTTP unless it says `#[http(skip)]`.
    pub(crate) http: bool,
    /// Options other than `http`, to be reported.
    pub(crate) bad_args: Vec<Meta>,
    /// Misplaced or malformed `#[http]` attributes, to be reported.
    pub(crate) http_errors: Vec<syn::Error>,
    pub(crate) self_ident: Option<Ident>,
    pub(crate) methods: Vec<GrainMethod>,
    pub(crate) on_activate: Option<ImplItemFn>,
    pub(crate) on_deactivate: Option<ImplItemFn>,
    /// `async fn on_reminder(&mut self, tick: ReminderTick) -> Result<(), GrainError>`: reminder ticks.
    pub(crate) on_reminder: Option<ImplItemFn>,
}

/// The receiver of a method, as written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receiver {
    Ref,
    RefMut,
    Value,
    None,
}

/// A `pub fn` with a receiver in a grain impl: a grain method (once validated).
pub(crate) struct GrainMethod {
    pub(crate) func: ImplItemFn,
    pub(crate) receiver: Receiver,
    pub(crate) args: Vec<(Ident, Type)>,
    /// Arguments whose pattern is not a plain identifier.
    pub(crate) bad_patterns: Vec<Pat>,
    pub(crate) output: Type,
    /// `#[http]` (`Some(true)`) or `#[http(skip)]` (`Some(false)`) on the method.
    pub(crate) http: Option<bool>,
}

impl GrainMethod {
    pub(crate) fn ident(&self) -> &Ident {
        &self.func.sig.ident
    }
}

fn lit_str(expr: &Expr, what: &str) -> syn::Result<LitStr> {
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Ok(s.clone()),
        other => Err(syn::Error::new_spanned(other, format!("`{what}` takes a string, e.g. {what} = \"...\""))),
    }
}

fn is_last_segment(ty: &Type, name: &str) -> bool {
    match ty {
        Type::Path(p) => p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == name),
        _ => false,
    }
}

/// Removes `#[http]` helper attributes from the methods of an impl block.
pub(crate) fn strip_http_attrs(item: &mut syn::ItemImpl) {
    for impl_item in item.items.iter_mut() {
        if let ImplItem::Fn(func) = impl_item {
            func.attrs.retain(|a| !a.path().is_ident("http"));
        }
    }
}

/// Reads `#[http]` (expose) or `#[http(skip)]` (do not expose) on a method.
fn http_attr(attrs: &[Attribute], errors: &mut Vec<syn::Error>) -> Option<bool> {
    let mut exposed = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident("http")) {
        match &attr.meta {
            Meta::Path(_) => exposed = Some(true),
            Meta::List(list) if list.tokens.to_string() == "skip" => exposed = Some(false),
            other => errors.push(syn::Error::new_spanned(
                other,
                "write `#[http]` to serve this method over HTTP, or `#[http(skip)]` to keep it off HTTP",
            )),
        }
    }
    exposed
}

/// Removes the `#[state(...)]` and `#[journal(...)]` helper attributes from the struct's fields.
pub(crate) fn strip_state_attrs(item: &mut syn::ItemStruct) {
    for field in item.fields.iter_mut() {
        field.attrs.retain(|a| !a.path().is_ident("state") && !a.path().is_ident("journal"));
    }
}

fn state_name(attrs: &[Attribute], default: &Ident) -> syn::Result<LitStr> {
    let mut name = LitStr::new(&default.to_string(), default.span());
    for attr in attrs.iter().filter(|a| a.path().is_ident("state")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                name = meta.value()?.parse()?;
                Ok(())
            } else {
                Err(meta.error("unknown state option: write #[state(name = \"...\")]"))
            }
        })?;
    }
    Ok(name)
}

/// The options of `#[journal(name = "...", snapshot_every = N)]` (both optional).
fn journal_options(attrs: &[Attribute], default: &Ident) -> syn::Result<FieldInit> {
    let mut name = LitStr::new(&default.to_string(), default.span());
    let mut snapshot_every = 0u64;
    for attr in attrs.iter().filter(|a| a.path().is_ident("journal")) {
        if matches!(attr.meta, Meta::Path(_)) {
            continue; // a bare `#[journal]`
        }
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                name = meta.value()?.parse()?;
                Ok(())
            } else if meta.path.is_ident("snapshot_every") {
                let every: syn::LitInt = meta.value()?.parse()?;
                snapshot_every = every.base10_parse::<u64>()?;
                Ok(())
            } else {
                Err(meta.error("unknown journal option: write #[journal(name = \"...\", snapshot_every = 100)]"))
            }
        })?;
    }
    Ok(FieldInit::Journal { name, snapshot_every })
}

impl GrainStruct {
    pub(crate) fn parse(args: TokenStream, mut item: syn::ItemStruct) -> syn::Result<Self> {
        let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
        // Every mistake is collected and reported at once (a field's bad attribute beside a bad option).
        let mut errors = crate::validate::Errors::default();
        let mut name = None;
        let mut idle_timeout = None;
        let mut placement = None;
        for meta in metas {
            let (slot, key) = match &meta {
                Meta::NameValue(nv) if nv.path.is_ident("name") => (&mut name, "name"),
                Meta::NameValue(nv) if nv.path.is_ident("idle_timeout") => (&mut idle_timeout, "idle_timeout"),
                Meta::NameValue(nv) if nv.path.is_ident("placement") => (&mut placement, "placement"),
                other => {
                    errors.push(syn::Error::new_spanned(
                        other,
                        "unknown grain option: expected `name = \"...\"`, `idle_timeout = \"10m\"` or `placement = \"random\"`",
                    ));
                    continue;
                }
            };
            let Meta::NameValue(nv) = &meta else { continue };
            match lit_str(&nv.value, key) {
                Ok(lit) => *slot = Some(lit),
                Err(error) => errors.push(error),
            }
        }
        let mut fields = Vec::new();
        if let syn::Fields::Unnamed(unnamed) = &item.fields {
            errors.push(syn::Error::new_spanned(
                unnamed,
                "a grain struct needs named fields (or none): write `struct Name { field: Type }`",
            ));
        }
        for field in item.fields.iter() {
            let Some(ident) = field.ident.clone() else { continue };
            let journaled = is_last_segment(&field.ty, "Journaled");
            let init = if is_last_segment(&field.ty, "PersistentState") {
                state_name(&field.attrs, &ident).map(FieldInit::State)
            } else if journaled {
                journal_options(&field.attrs, &ident)
            } else if is_last_segment(&field.ty, "GrainContext") {
                Ok(FieldInit::Context)
            } else {
                Ok(FieldInit::Default)
            };
            let init = init.unwrap_or_else(|error| {
                errors.push(error);
                FieldInit::Default
            });
            let misplaced = field
                .attrs
                .iter()
                .filter(|a| if journaled { a.path().is_ident("state") } else { a.path().is_ident("journal") })
                .cloned()
                .collect();
            fields.push(GrainField { ident, init, misplaced });
        }
        errors.finish()?;
        strip_state_attrs(&mut item);
        Ok(Self { item, name, idle_timeout, placement, fields })
    }
}

impl GrainImpl {
    pub(crate) fn parse(args: TokenStream, mut item: syn::ItemImpl) -> syn::Result<Self> {
        let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
        let (http, bad_args): (Vec<Meta>, Vec<Meta>) =
            metas.into_iter().partition(|meta| matches!(meta, Meta::Path(p) if p.is_ident("http")));
        let http = !http.is_empty();
        let mut http_errors = Vec::new();
        let self_ident = match &*item.self_ty {
            Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.clone()),
            _ => None,
        };
        let mut methods = Vec::new();
        let mut on_activate = None;
        let mut on_deactivate = None;
        let mut on_reminder = None;
        for impl_item in &item.items {
            let ImplItem::Fn(func) = impl_item else { continue };
            let name = func.sig.ident.to_string();
            if name == "on_activate" {
                on_activate = Some(func.clone());
                continue;
            }
            if name == "on_deactivate" {
                on_deactivate = Some(func.clone());
                continue;
            }
            if name == "on_reminder" {
                on_reminder = Some(func.clone());
                continue;
            }
            let exposed = http_attr(&func.attrs, &mut http_errors);
            let misplaced = |what: &str| {
                syn::Error::new_spanned(
                    &func.sig.ident,
                    format!("`#[http]` goes on grain methods (`pub async fn` taking `&self` or `&mut self`); {what}"),
                )
            };
            if matches!(func.vis, syn::Visibility::Inherited) {
                if exposed.is_some() {
                    http_errors.push(misplaced("this function is private"));
                }
                continue; // private helpers stay plain methods
            }
            let mut receiver = Receiver::None;
            let mut args = Vec::new();
            let mut bad_patterns = Vec::new();
            for input in &func.sig.inputs {
                match input {
                    FnArg::Receiver(r) => {
                        receiver = match (&r.reference, &*r.ty) {
                            (Some(_), _) if r.mutability.is_some() => Receiver::RefMut,
                            (Some(_), _) => Receiver::Ref,
                            (None, Type::Reference(tr)) if tr.mutability.is_some() => Receiver::RefMut,
                            (None, Type::Reference(_)) => Receiver::Ref,
                            (None, _) => Receiver::Value,
                        };
                    }
                    FnArg::Typed(pt) => match &*pt.pat {
                        Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => {
                            args.push((pi.ident.clone(), (*pt.ty).clone()))
                        }
                        other => bad_patterns.push(other.clone()),
                    },
                }
            }
            if receiver == Receiver::None {
                if exposed.is_some() {
                    http_errors.push(misplaced("this function takes no `self`"));
                }
                continue; // associated functions (constructors, helpers) are not grain methods
            }
            let output = match &func.sig.output {
                syn::ReturnType::Default => syn::parse_quote_spanned!(func.sig.span()=> ()),
                syn::ReturnType::Type(_, ty) => (**ty).clone(),
            };
            let mut func = func.clone();
            func.attrs.retain(|a| !a.path().is_ident("http"));
            methods.push(GrainMethod { func, receiver, args, bad_patterns, output, http: exposed });
        }
        strip_http_attrs(&mut item);
        Ok(Self { item, http, bad_args, http_errors, self_ident, methods, on_activate, on_deactivate, on_reminder })
    }
}
