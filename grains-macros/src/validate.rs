//! Checks a parsed grain against the rules, collecting every violation (combined into one error set) with a
//! span on the offending tokens and a message that says what to write instead.

use std::collections::HashMap;

use quote::ToTokens;
use syn::spanned::Spanned;
use syn::{GenericArgument, PathArguments, Type};

use crate::parse::{GrainImpl, GrainMethod, GrainStruct, Receiver};

/// Collects errors, to report them all at once.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The placement strategies `#[grain(placement = "...")]` accepts, with their `grains::Placement` variants:
/// the one list the check, its message and the expansion read.
pub(crate) const PLACEMENTS: &[(&str, &str)] = &[
    ("random", "Random"),
    ("prefer_local", "PreferLocal"),
    ("hash", "Hash"),
    ("fewest_activations", "FewestActivations"),
];

/// Names the generated reference already uses for its own methods.
const RESERVED: &[&str] = &["id", "with_timeout", "core", "from_core"];

pub(crate) fn grain_struct(model: &GrainStruct) -> syn::Result<()> {
    let mut errors = Errors::default();
    let generics = &model.item.generics;
    if !generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            generics,
            "a grain struct cannot be generic: the silo looks grain types up by name at run time. \
             Declare a concrete struct per grain type, e.g. `struct IntCounter { inner: Counter<i64> }`",
        ));
    }
    if let Some(lit) = &model.placement
        && !PLACEMENTS.iter().any(|(name, _)| *name == lit.value())
    {
        let names: Vec<_> = PLACEMENTS.iter().map(|(name, _)| format!("{name:?}")).collect();
        errors.push(syn::Error::new_spanned(lit, format!("unknown placement: write one of {}", names.join(", "))));
    }
    if let Some(lit) = &model.idle_timeout
        && let Err(reason) = crate::duration::parse_duration(&lit.value())
    {
        errors.push(syn::Error::new_spanned(
            lit,
            format!("invalid idle_timeout: {reason}; write e.g. \"30s\", \"10m\" or \"1h30m\""),
        ));
    }
    if let Some(lit) = &model.name
        && lit.value().trim().is_empty()
    {
        errors.push(syn::Error::new_spanned(lit, "a grain type name cannot be empty"));
    }
    for attr in model.fields.iter().flat_map(|f| &f.misplaced) {
        let message = if attr.path().is_ident("journal") {
            "#[journal] goes on a field of type `Journaled<S>` (event-sourced state); \
             for `PersistentState<T>` write #[state(name = \"...\")]"
        } else {
            "#[state] goes on a `PersistentState<T>` field; a `Journaled<S>` field takes \
             #[journal(name = \"...\", snapshot_every = N)]"
        };
        errors.push(syn::Error::new_spanned(attr, message));
    }
    errors.finish()
}

/// Whether a struct refused by [`grain_struct`] can still be expanded, its invalid options taking their
/// defaults: it is not generic and has no misplaced field attribute.
pub(crate) fn expandable(model: &GrainStruct) -> bool {
    model.item.generics.params.is_empty() && model.fields.iter().all(|f| f.misplaced.is_empty())
}

pub(crate) fn grain_impl(model: &GrainImpl) -> syn::Result<()> {
    let mut errors = Errors::default();
    let item = &model.item;
    for arg in &model.bad_args {
        errors.push(syn::Error::new_spanned(
            arg,
            "`#[grain]` on an impl block takes only `http` (serve its methods over HTTP): put other options on the \
             struct, e.g. `#[grain(idle_timeout = \"10m\")]`",
        ));
    }
    for error in &model.http_errors {
        errors.push(error.clone());
    }
    if let Some((_, path, _)) = &item.trait_ {
        errors.push(syn::Error::new_spanned(
            path,
            "#[grain] goes on the grain's inherent impl block (`impl Cart { ... }`), not on a trait impl",
        ));
    }
    if !item.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &item.generics,
            "a grain impl cannot be generic: grain types are concrete, declare one struct per grain type",
        ));
    }
    if model.self_ident.is_none() {
        errors.push(syn::Error::new_spanned(
            &item.self_ty,
            "#[grain] needs an impl of a named struct: `impl Cart { ... }`",
        ));
    }
    let mut seen: HashMap<String, &GrainMethod> = HashMap::new();
    for method in &model.methods {
        check_method(method, &mut errors);
        let name = method.ident().to_string();
        if seen.insert(name.clone(), method).is_some() {
            errors.push(syn::Error::new_spanned(
                method.ident(),
                format!("duplicate grain method `{name}`: grain methods are called by name, give each a distinct name"),
            ));
        }
    }
    for hook in [&model.on_activate, &model.on_deactivate].into_iter().flatten() {
        check_hook(hook, HookArg::Context, &mut errors);
    }
    if let Some(hook) = &model.on_reminder {
        check_hook(hook, HookArg::Tick, &mut errors);
    }
    errors.finish()
}

/// What a lifecycle hook takes after `&mut self`.
#[derive(Clone, Copy)]
enum HookArg {
    /// `ctx: &GrainContext` (`on_activate`, `on_deactivate`).
    Context,
    /// `tick: ReminderTick` (`on_reminder`).
    Tick,
}

/// Checks a lifecycle hook's signature, so that a mistake is reported at the hook, with the signature to write,
/// rather than as a type error in generated code.
fn check_hook(hook: &syn::ImplItemFn, arg: HookArg, errors: &mut Errors) {
    let sig = &hook.sig;
    let name = &sig.ident;
    let signature = match arg {
        HookArg::Context => format!("async fn {name}(&mut self, ctx: &GrainContext) -> Result<(), GrainError>"),
        HookArg::Tick => format!("async fn {name}(&mut self, tick: ReminderTick) -> Result<(), GrainError>"),
    };
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new_spanned(sig.fn_token, format!("lifecycle hooks are async: write `{signature}`")));
    }
    let mut inputs = sig.inputs.iter();
    let receiver_ok = matches!(inputs.next(), Some(syn::FnArg::Receiver(r)) if r.reference.is_some());
    let rest: Vec<_> = inputs.collect();
    let arg_ok = match rest.as_slice() {
        [syn::FnArg::Typed(typed)] => match (arg, &*typed.ty) {
            (HookArg::Context, Type::Reference(r)) => {
                r.mutability.is_none() && last_segment_is(&r.elem, "GrainContext")
            }
            (HookArg::Tick, ty) => last_segment_is(ty, "ReminderTick"),
            _ => false,
        },
        _ => false,
    };
    if !receiver_ok || !arg_ok {
        let takes = match arg {
            HookArg::Context => "`&mut self` and `ctx: &GrainContext`",
            HookArg::Tick => "`&mut self` and `tick: ReminderTick`",
        };
        errors.push(syn::Error::new(
            sig.paren_token.span.join(),
            format!("the `{name}` hook takes {takes}: write `{signature}`"),
        ));
    }
    if let syn::ReturnType::Default = sig.output {
        errors.push(syn::Error::new_spanned(
            name,
            format!("the `{name}` hook returns `Result<(), GrainError>`: write `{signature}`"),
        ));
    }
}

/// Whether `ty` is a path whose last segment is `name` (`GrainContext`, `grains::GrainContext`).
fn last_segment_is(ty: &Type, name: &str) -> bool {
    matches!(ty, Type::Path(path) if path.path.segments.last().is_some_and(|s| s.ident == name))
}

fn check_method(method: &GrainMethod, errors: &mut Errors) {
    let sig = &method.func.sig;
    let name = &sig.ident;
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new_spanned(
            sig.fn_token,
            format!(
                "grain method `{name}` must be async: write `pub async fn {name}(...)`. \
                 (Make it private if it is a helper and not a grain method.)"
            ),
        ));
    }
    if method.receiver == Receiver::Value {
        let receiver = sig.receiver().map(|r| r.span()).unwrap_or_else(|| sig.span());
        errors.push(syn::Error::new(
            receiver,
            format!("grain method `{name}` takes `self` by value, but the runtime owns the grain: take `&self` or `&mut self`"),
        ));
    }
    if !sig.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            format!(
                "grain method `{name}` cannot be generic: its arguments cross the wire, so give them concrete types"
            ),
        ));
    }
    if RESERVED.contains(&name.to_string().as_str()) {
        errors.push(syn::Error::new_spanned(
            name,
            format!("`{name}` is a method of the generated reference: rename this grain method"),
        ));
    }
    for pat in &method.bad_patterns {
        errors.push(syn::Error::new_spanned(
            pat,
            "grain method arguments need plain names (`item: String`), not patterns",
        ));
    }
    for (arg, ty) in &method.args {
        if let Some(message) = unowned_type(ty) {
            errors.push(syn::Error::new_spanned(ty, format!("argument `{arg}` of grain method `{name}`: {message}")));
        }
    }
    if let Some(message) = unowned_type(&method.output) {
        errors
            .push(syn::Error::new_spanned(&method.output, format!("return type of grain method `{name}`: {message}")));
    }
}

/// Why `ty` cannot cross the wire by value, if it cannot.
fn unowned_type(ty: &Type) -> Option<String> {
    match ty {
        Type::Reference(r) => {
            let owned = match &*r.elem {
                Type::Path(p) if p.path.is_ident("str") => "String".to_owned(),
                Type::Slice(s) => format!("Vec<{}>", s.elem.to_token_stream()),
                other => other.to_token_stream().to_string(),
            };
            Some(format!(
                "references cannot cross the wire; take an owned value: write `{owned}` instead of `{}`",
                ty.to_token_stream()
            ))
        }
        Type::ImplTrait(_) => Some("`impl Trait` cannot cross the wire; name a concrete type".to_owned()),
        Type::TraitObject(_) => Some("trait objects cannot cross the wire; name a concrete type".to_owned()),
        Type::Ptr(_) => Some("raw pointers cannot cross the wire".to_owned()),
        Type::Paren(p) => unowned_type(&p.elem),
        Type::Tuple(t) => t.elems.iter().find_map(unowned_type),
        Type::Array(a) => unowned_type(&a.elem),
        Type::Slice(s) => unowned_type(&s.elem),
        Type::Path(p) => p.path.segments.iter().find_map(|seg| match &seg.arguments {
            PathArguments::AngleBracketed(args) => args.args.iter().find_map(|a| match a {
                GenericArgument::Type(t) => unowned_type(t),
                GenericArgument::Lifetime(_) => {
                    Some("borrowed types cannot cross the wire; take an owned value".to_owned())
                }
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use crate::parse::GrainStruct;

    /// The messages `#[grain(<args>)]` on `pub struct Cart;` is refused with (none if accepted).
    fn struct_errors(args: proc_macro2::TokenStream) -> Vec<String> {
        let item: syn::ItemStruct = syn::parse_quote!(
            pub struct Cart;
        );
        let model = GrainStruct::parse(args, item).unwrap_or_else(|e| panic!("does not parse: {e}"));
        match super::grain_struct(&model) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_valid_idle_timeout_and_placement_are_accepted() {
        assert_eq!(struct_errors(quote!(idle_timeout = "1h30m", placement = "hash")), Vec::<String>::new());
    }

    #[test]
    fn an_idle_timeout_in_words_is_refused_with_the_reason_and_an_example() {
        let errors = struct_errors(quote!(idle_timeout = "10 minutes"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("invalid idle_timeout: unknown duration unit"), "{errors:?}");
        assert!(errors[0].contains("\"10m\""), "says what to write: {errors:?}");
    }

    #[test]
    fn every_parse_error_of_a_struct_is_reported_at_once() {
        let item: syn::ItemStruct = syn::parse_quote!(
            pub struct Cart {
                #[state(nom = "items")]
                items: PersistentState<u32>,
                #[journal(every = 3)]
                log: Journaled<u32>,
            }
        );
        let errors = match GrainStruct::parse(quote!(colour = "red", idle_timeout = 10), item) {
            Ok(_) => panic!("parsed"),
            Err(errors) => errors.into_iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        };
        assert_eq!(errors.len(), 4, "the option, the value, the state and the journal attribute: {errors:?}");
    }

    /// The messages `#[grain] impl Cart { <hook> }` is refused with.
    fn impl_errors(hook: proc_macro2::TokenStream) -> Vec<String> {
        let item: syn::ItemImpl = syn::parse_quote!(
            impl Cart {
                #hook
            }
        );
        let model = crate::parse::GrainImpl::parse(quote!(), item).unwrap_or_else(|e| panic!("does not parse: {e}"));
        match super::grain_impl(&model) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn hooks_with_the_documented_signatures_are_accepted() {
        let errors = impl_errors(quote!(
            async fn on_activate(&mut self, ctx: &grains::GrainContext) -> Result<(), GrainError> {
                Ok(())
            }
            async fn on_deactivate(&mut self, _: &GrainContext) -> Result<(), GrainError> {
                Ok(())
            }
            async fn on_reminder(&mut self, tick: ReminderTick) -> Result<(), GrainError> {
                Ok(())
            }
        ));
        assert_eq!(errors, Vec::<String>::new());
    }

    #[test]
    fn a_hook_without_its_context_is_refused_with_the_signature_to_write() {
        let errors = impl_errors(quote!(
            async fn on_activate(&mut self) -> Result<(), GrainError> {
                Ok(())
            }
        ));
        assert_eq!(
            errors,
            ["the `on_activate` hook takes `&mut self` and `ctx: &GrainContext`: write \
              `async fn on_activate(&mut self, ctx: &GrainContext) -> Result<(), GrainError>`"]
        );
    }

    #[test]
    fn every_mistake_of_a_hook_is_reported_at_once() {
        let errors = impl_errors(quote!(
            fn on_reminder(self, tick: u64) {}
        ));
        assert_eq!(errors.len(), 3, "not async, wrong arguments, no result: {errors:?}");
    }

    #[test]
    fn every_invalid_option_is_reported_at_once() {
        let errors = struct_errors(quote!(idle_timeout = "soon", placement = "closest", name = " "));
        assert_eq!(errors.len(), 3, "{errors:?}");
    }
}
